#!/usr/bin/env bash
# Downloads into wheels/ (ignored by git) what bench/gpu_check.sh installs on the GPU machine, which has no network:
# peft (FRoD needs >= 0.20; default: the version installed here) and the dependencies of peft that a bare torch +
# transformers image may lack (accelerate, psutil for Python 3.12). Carry wheels/ with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PEFT_VERSION=${PEFT_VERSION:-$("$PY" -c "import peft; print(peft.__version__)" 2>/dev/null || echo 0.21.2)}
mkdir -p wheels
"$PY" -m pip download --no-deps -d wheels "peft==$PEFT_VERSION" accelerate
"$PY" -m pip download --no-deps -d wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 psutil
ls -l wheels
