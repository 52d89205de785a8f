"""Compile each csrc/*.cu for sm_80 and sm_90 with ``-Xptxas -v``, print every kernel's registers, shared memory,
stack frame and spills, and exit non-zero on a compile error, any spill or any local memory.

    python csrc/ptxas_report.py [--arch 80,90] [FILE.cu ...]

The .cu files include only CUDA headers, so nvcc compiles each one straight to a cubin, without torch's build, with
the flags that build gives them: torch's COMMON_NVCC_FLAGS (the half/bfloat16 defines csrc/ is written for) and
setup.py's own nvcc flags. nvcc 13's ptxas reports local memory (a local array, or spills) as the stack frame.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

# setup.py's "nvcc" extra_compile_args, and the C++ standard torch builds with
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse(log: str) -> list[dict]:
    """One dict per kernel ptxas compiled, in the order of its ``-v`` log."""
    kernels = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append({"kernel": m.group(1), "arch": int(m.group(2)), "smem": 0})
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif kernels and (m := _USED.search(line)):
            kernels[-1]["regs"] = int(m.group(1))
            if s := _SMEM.search(line):
                kernels[-1]["smem"] = int(s.group(1))
    return kernels


def failures(k: dict) -> list[str]:
    out = []
    if k["spill_stores"] or k["spill_loads"]:
        out.append(f"spills {k['spill_stores']} B stored, {k['spill_loads']} B loaded")
    if k["stack"]:
        out.append(f"local memory: {k['stack']} B stack frame a thread")
    return out


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    # "void ns::(anonymous namespace)::kernel<float, 4>(float const*, ...)" -> "ns::kernel<float, 4>"
    return [re.sub(r"^void ", "", n.replace("(anonymous namespace)::", "")).split("(")[0]
            for n in out.splitlines()]


def compile_cu(nvcc: str, src: Path, arch: int, flags: list[str]) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", *flags, "-Xptxas", "-v", str(src),
               "-o", os.path.join(tmp, "out.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="*", type=Path, help="default: every .cu beside this script")
    p.add_argument("--arch", default="80,90", help="compute capabilities (default: %(default)s)")
    a = p.parse_args(argv)
    sources = a.sources or sorted(here.glob("*.cu"))
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    flags = [*COMMON_NVCC_FLAGS, *NVCC_FLAGS]
    rows, bad = [], 0
    for src in sources:
        for arch in (int(x) for x in a.arch.split(",")):
            rc, log = compile_cu(nvcc, src, arch, flags)
            kernels = parse(log)
            if rc != 0 or not kernels:
                print(f"FAIL: {src.name} for sm_{arch}: nvcc exit {rc}, {len(kernels)} kernels\n{log}")
                bad += 1
                continue
            for k, name in zip(kernels, demangle([k["kernel"] for k in kernels])):
                why = failures(k)
                bad += bool(why)
                rows.append([src.name, name, f"sm_{k['arch']}", str(k["regs"]), str(k["smem"]), str(k["stack"]),
                             f"{k['spill_stores']}/{k['spill_loads']}", "FAIL: " + "; ".join(why) if why else "ok"])
    head = ["file", "kernel", "arch", "regs", "smem", "stack", "spill st/ld", "result"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    print(f"{len(rows)} kernels, {bad} failed" if bad else f"{len(rows)} kernels, no spills, no local memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
