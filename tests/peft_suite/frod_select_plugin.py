"""pytest plugin (``-p frod_select_plugin``): keeps PEFT's FRoD test cases, deselects the rest.

A case is FRoD's when its parametrization involves ``FrodConfig`` (the class, an instance, a ``functools.partial``
of it, or any of these inside a tuple, list or dict), or when its module, class or function name says "frod". Test
ids are not enough: PEFT parametrizes some tests with config instances, whose ids (``config06``) name no tuner.
Both runs of tests/peft_suite/run.py load this plugin, so they select the same cases.

A case that fails because it needs the Hugging Face Hub, which the runs cannot reach (``HF_HUB_OFFLINE=1``), is
reported as skipped, saying so: it tests PEFT's downloads, which acceleration does not touch.
"""

from __future__ import annotations

import functools

import pytest
from huggingface_hub.errors import OfflineModeIsEnabled
from peft import FrodConfig


def involves_frod(value) -> bool:
    if isinstance(value, type):
        return issubclass(value, FrodConfig)
    if isinstance(value, FrodConfig):
        return True
    if isinstance(value, functools.partial):
        return involves_frod(value.func)
    if isinstance(value, dict):
        return any(involves_frod(v) for v in value.values())
    if isinstance(value, (tuple, list, set, frozenset)):
        return any(involves_frod(v) for v in value)
    return False


def is_frod_case(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(involves_frod(v) for v in params.values()):
        return True
    # the node id without its parametrization: file, class and function names
    return "frod" in item.nodeid.split("[", 1)[0].lower()


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if is_frod_case(item)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not is_frod_case(item)])
        items[:] = keep


def _needs_the_hub(exc: "BaseException | None") -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OfflineModeIsEnabled):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _needs_the_hub(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           "Skipped: needs the Hugging Face Hub, which this run cannot reach (HF_HUB_OFFLINE=1)")
