"""The package's imports run one way (docs/DESIGN.md section 4): no import cycle, the registry a leaf, the cache
ignorant of what it stores, backends ignorant of the policy, and every import from a lower layer to a higher one
named here with its reason. Read from the source with ast, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "frod_kernels"

# Low to high. A module imports only modules of its own layer or below, except for UPWARD.
LAYERS = [
    ["_env", "_numerics", "_table", "_tensor_cache", "reference", "registry"],
    ["layout", "_validation", "cache", "frozen_gemm"],
    ["backends"],
    ["autotune"],
    ["engine", "cost_model", "dispatch"],
    ["ops"],
    ["projections"],
    ["nn", "roofline"],
    ["peft"],
    ["bench", "__init__"],
]
# (importer, imported) -> why the rule bends.
UPWARD = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a ``from pkg import sub`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("frod_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("frod_kernels"):
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {target}
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer(graph):
    for module in graph:
        _layer(module)


def test_no_import_cycle(graph):
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_imports_run_downward(graph):
    upward = {(m, n) for m, deps in graph.items() for n in deps if _layer(n) > _layer(m)
              and m.split(".")[:2] != n.split(".")[:2]}
    assert upward == set(UPWARD), f"imports from a lower layer to a higher one: {sorted(upward - set(UPWARD))}"
    assert len(UPWARD) <= 2


def test_the_registry_is_a_leaf_and_the_cache_stores_anything(graph):
    assert graph["frod_kernels.registry"] == set()
    cache = graph["frod_kernels.cache"] | graph["frod_kernels.cache.__main__"]
    assert cache <= {"frod_kernels._env", "frod_kernels._tensor_cache", "frod_kernels._table", "frod_kernels.cache"}


def test_backends_know_nothing_of_the_policy(graph):
    for module, deps in graph.items():
        if module.startswith("frod_kernels.backends"):
            assert not {d for d in deps if d.split(".")[1] in ("autotune", "dispatch", "ops", "engine", "nn", "peft")}
