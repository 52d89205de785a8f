"""csrc/ptxas_report.py, the CUDA C++ half of the compile check (csrc/ci_build_check.sh runs it on csrc/*.cu): it
must fail on a kernel that uses local memory, from a real nvcc compile where the toolkit is present."""

import importlib.util
import os
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "csrc" / "ptxas_report.py"
_spec = importlib.util.spec_from_file_location("ptxas_report", _PATH)
ptxas_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas_report)

_NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")

LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_90'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 356 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_80'
ptxas info    : Function properties for _Z5spillPf
    3824 bytes stack frame, 4524 bytes spill stores, 5388 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 3824 bytes cumulative stack size, 1024 bytes smem
"""


def test_parse_reads_each_kernel_of_a_ptxas_log():
    fast, spill = ptxas_report.parse(LOG)
    assert fast == {"kernel": "_Z4fastPf", "arch": 90, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                    "regs": 40}
    assert spill == {"kernel": "_Z5spillPf", "arch": 80, "smem": 1024, "stack": 3824, "spill_stores": 4524,
                     "spill_loads": 5388, "regs": 64}
    assert ptxas_report.failures(fast) == []
    assert [f.split()[0] for f in ptxas_report.failures(spill)] == ["spills", "local"]


@pytest.mark.skipif(not os.path.exists(_NVCC), reason=f"no nvcc at {_NVCC} (set CUDA_HOME)")
def test_a_kernel_with_local_memory_fails(tmp_path, capsys):
    src = tmp_path / "local_array.cu"
    # A per-thread array indexed by data, too big for the 64 registers that 1024 threads leave: local memory.
    src.write_text("__global__ void __launch_bounds__(1024) local_array(float* out, const int* idx) {\n"
                   "  float a[256];\n"
                   "  for (int j = 0; j < 256; ++j) a[j] = out[j * threadIdx.x];\n"
                   "  out[threadIdx.x] = a[idx[threadIdx.x] & 255];\n"
                   "}\n")
    assert ptxas_report.main([str(src), "--arch", "90"]) == 1
    out = capsys.readouterr().out
    assert "local_array" in out and "FAIL: local memory: 1024 B stack frame" in out, out
