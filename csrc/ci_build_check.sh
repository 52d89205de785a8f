#!/usr/bin/env bash
# CI compile check of csrc/ on a machine without a GPU: builds the extension against a CUDA build of torch in its
# own venv (reused when present), loads it, checks its op schemas against the Python ones, runs
# tests/backends/test_cuda_backend.py (the GPU tests skip), then compiles every .cu for sm_80 and sm_90 with -Xptxas -v and
# prints each kernel's registers, shared memory, stack frame and spills (csrc/ptxas_report.py). Exits non-zero if
# anything fails to compile, link or load, or if any kernel spills or uses local memory.
#
# Works on a copy of the sources under $FROD_CUDA_CI_DIR (default build/cuda-ci) so that no extension built for
# this torch lands in the repository's frod_kernels/, where the project's own venv (another torch) would find it.
#
# Environment: FROD_CUDA_VENV (default /tmp/frod-cuda-venv; a venv that has a CUDA torch, such as the one the README's
# command makes, keeps it and gets only the build tools it lacks), FROD_CUDA_TORCH (default torch==2.14.1, a CUDA 13.0
# build), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0: one arch keeps CI short),
# MAX_JOBS (default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FROD_CUDA_VENV:-/tmp/frod-cuda-venv}"
work="${FROD_CUDA_CI_DIR:-$repo/build/cuda-ci}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FROD_BUILD_CUDA=1
start=$SECONDS

if ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  echo "== creating $venv with ${FROD_CUDA_TORCH:-torch==2.14.1}"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${FROD_CUDA_TORCH:-torch==2.14.1}"
fi
# frod_kernels itself imports tqdm (the projections' progress bar) and safetensors (the projection cache);
# transformers and peft stay optional there.
if ! "$venv/bin/python" -c "import ninja, setuptools, pytest, tqdm, safetensors" 2>/dev/null; then
  echo "== installing ninja, setuptools, pytest, tqdm, safetensors into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check ninja setuptools wheel pytest numpy tqdm safetensors
fi
export PATH="$venv/bin:$PATH"  # ninja
py="$venv/bin/python"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The pip-installed CUDA headers fill what the local toolkit lacks (cusparse.h and friends).
if [ -d "$site/nvidia/cu13/include" ]; then
  export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
fi

echo "== copying sources to $work/src"
rm -rf "$work/src"
mkdir -p "$work/src"
# cp -a keeps modification times, so ninja rebuilds only the objects whose sources changed.
cp -a "$repo/setup.py" "$repo/README.md" "$repo/pyproject.toml" "$repo/csrc" "$repo/frod_kernels" "$repo/tests" \
  "$work/src/"
find "$work/src" \( -name '__pycache__' -o -name '*.so' \) -prune -exec rm -rf {} +
cd "$work/src"

echo "== building frod_kernels._C for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with $("$py" -c 'import torch; print(torch.__version__)')"
"$py" setup.py -q build_ext --inplace --build-temp "$work/tmp"

echo "== loading it and comparing schemas"
"$py" - <<'PY'
import torch
import frod_kernels  # noqa: F401  (defines the frod:: ops)
from frod_kernels.backends import cuda as cuda_backend

mod, reason = cuda_backend.load_extension()
if mod is None:
    raise SystemExit(f"FAIL: {reason}")
for op in ("row_gather_diag", "sampled_dot_diag"):
    py = str(getattr(torch.ops.frod, op).default._schema).removeprefix("frod::")
    cpp = str(getattr(torch.ops.frod_cuda, op).default._schema).removeprefix("frod_cuda::")
    if py != cpp:
        raise SystemExit(f"FAIL: schema of {op} differs:\n  python: {py}\n  C++:    {cpp}")
    print(f"ok {op}: {cpp}")
print("torch.ops.frod_cuda loaded from", mod.__file__, "built for torch", mod.TORCH_VERSION)
PY

echo "== tests/backends/test_cuda_backend.py (GPU tests skip without a GPU)"
"$py" -m pytest -q -p no:cacheprovider tests/backends/test_cuda_backend.py

echo "== ptxas report: csrc/*.cu for sm_80 and sm_90 (-Xptxas -v); fails on spills and local memory"
"$py" csrc/ptxas_report.py --arch 80,90
echo "== csrc/ci_build_check.sh passed in $((SECONDS - start)) s"
