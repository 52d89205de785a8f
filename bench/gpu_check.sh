#!/usr/bin/env bash
# The one-call GPU check: install what the GPU machine lacks (from wheels/, it has no network), build the CUDA
# extension for sm_90, run the tests (a missing Triton or, once built, CUDA backend fails them), time the host
# overhead and each kernel-family op per backend (`frod-bench --suite overhead,kernels`), run `frod-bench --full`,
# and print the short tables last. Every step has a time limit inside an overall budget (default 470 s, under the
# 8 minutes an H200 session allows), its log goes to $OUT/<step>.log and its exit status to $OUT/steps.tsv; a
# failing step is recorded, never fatal, so one call always brings back whatever could be measured.
#
#   OUT=/path/to/results bash bench/gpu_check.sh      # default OUT: bench_out/gpu_check
#   bash bench/fetch_wheels.sh                         # beforehand, on a machine with network
#
# GPU_CHECK_SKIP="build tests" skips those steps (names: install-peft build tests host init-8b bench init-cpu),
# for a quick rerun; GPU_CHECK_BUDGET_S sets the overall budget in seconds.
#
# Without a GPU (or with GPU_CHECK_DRY_RUN=1) it dry-runs the same script here: no install or build, test
# collection only, frod-bench on the CPU with tiny sizes. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench_out/gpu_check}
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
START=$SECONDS


FAILED=0
# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of the budget), log it, record its status.
step() {
    local name=$1 limit=$2 left rc t0=$SECONDS
    shift 2
    case " ${GPU_CHECK_SKIP:-} " in *" $name "*) skip "$name" "GPU_CHECK_SKIP"; return 0 ;; esac
    left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        printf '%s\tskipped (budget)\t0\n' "$name" >> "$OUT/steps.tsv"
        FAILED=1
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "   timed out after ${limit}s"
    tail -n "${TAIL:-8}" "$OUT/$name.log" | sed 's/^/   /'
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

skip() {
    echo "== $1: skipped ($2)"
    printf '%s\tskipped (%s)\t0\n' "$1" "$2" >> "$OUT/steps.tsv"
}

# One interpreter start for both: each costs seconds (torch's import) and the dry run runs inside the tests.
"$PY" -c "import sys, torch; gpu = torch.cuda.is_available(); print('python', sys.version.split()[0], 'torch',
    torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if gpu else 'no GPU'); sys.exit(
    0 if gpu else 3)" | tee "$OUT/machine.txt"
HAVE_GPU=${PIPESTATUS[0]}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" != 1 ] && [ "$HAVE_GPU" != 0 ]; then
    echo "gpu_check: torch sees no CUDA device: dry run on the CPU"
    DRY=1
fi

if [ "$DRY" = 1 ]; then
    skip install-peft "dry run"
    skip build "dry run"
    step tests 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider tests
    step host 60 "$PY" -m frod_kernels.bench --suite overhead,kernels --sizes tiny --device cpu --out "$OUT/host"
    step init-8b 60 "$PY" bench/init_projections.py --hidden 64 --layers 2 --methods frod_kernels \
        --json "$OUT/init-8b-gpu.json"
    step bench 120 "$PY" -m frod_kernels.bench --suite check,layer,train,init --sizes tiny --device cpu \
        --out "$OUT"
else
    if "$PY" -c "import peft.tuners.frod" 2>/dev/null; then
        skip install-peft "peft with FRoD is already installed"
    else
        step install-peft 90 "$PY" -m pip install --no-index --find-links wheels peft
    fi
    if find csrc \( -name '*.cu' -o -name '*.cpp' \) 2>/dev/null | grep -q .; then
        # The torch there differs from the one here: the extension is built on the GPU machine, for sm_90 only.
        step build 200 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" FROD_BUILD_CUDA=1 \
            "$PY" -m pip install --no-build-isolation --no-index --no-deps -e .
    else
        skip build "no csrc/ sources"
    fi
    # The tests fail, rather than skip, where a backend that must run here cannot: Triton always; the CUDA C++
    # backend once this run has built it (a failed build is already a failed step, a skipped one proves nothing).
    REQUIRE=triton
    grep -q $'^build\t0\t' "$OUT/steps.tsv" && REQUIRE=triton,cuda
    echo "tests require backends: $REQUIRE"
    "$PY" -c "import frod_kernels as fk, json; print(json.dumps(fk.available_backends()))" > "$OUT/backends.json" 2>&1
    echo "backends: $(cat "$OUT/backends.json")"
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    # shellcheck disable=SC2086 # XDIST is empty or two words
    # The compile reports are CPU work that CI already does: not on the GPU's clock.
    step tests 180 env FROD_REQUIRE_BACKENDS="$REQUIRE" "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 $XDIST \
        --ignore=tests/backends/test_triton_compile.py --ignore=tests/backends/test_ptxas_report.py tests
    # issue 18 and 21: host time per call (CPU enqueue and CUDA events) and each kernel-family op per backend; the
    # gpu preset keeps them to about a minute (its own results, so the full bench's cannot overwrite them)
    step host 90 "$PY" -m frod_kernels.bench --suite overhead,kernels --out "$OUT/host"
    # issue 7: the GPU projection route on an 8B-shaped model (32 layers, width 4096, q_proj + quarter v_proj)
    step init-8b 150 "$PY" bench/init_projections.py --device cuda --hidden 4096 --layers 32 \
        --methods frod_kernels --json "$OUT/init-8b-gpu.json"
    step bench 300 "$PY" -m frod_kernels.bench --suite check,layer,train,init --full --all-paths --out "$OUT"
    # issue 7 on a many-core CPU (this machine's): PEFT, exact and fast routes side by side, width 2048
    step init-cpu 90 "$PY" bench/init_projections.py --hidden 2048 --layers 16 \
        --methods peft frod_kernels frod_kernels_fast --json "$OUT/init-cpu-2048.json"
fi

echo
echo "== steps (name, exit status, seconds) =="
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
for dir in "$OUT/host" "$OUT"; do
    echo
    if [ -f "$dir/summary.txt" ]; then
        cat "$dir/summary.txt"
    elif [ -f "$dir/results.json" ]; then  # a bench stopped early: what its finished suites saved
        "$PY" -m frod_kernels.bench --summarize "$dir/results.json"
    fi
done
echo "total $((SECONDS - START)) s; logs and results.json under $OUT"
exit $FAILED
