#!/usr/bin/env bash
# The whole GPU check in one command, for a CUDA machine without network (run from anywhere):
#
#     bash scripts/gpu_suite.sh            # results and logs under benchmarks/results/ (and $OUT/results/ if set)
#
# Steps, each time-limited; a failing step is recorded and the next one still runs:
#   build      pip install --no-build-isolation --no-deps -e .   (compiles the CUDA extension for this GPU's arch,
#              VLMKERN_REQUIRE_CUDA=1; if it fails, `setup.py build_ext --inplace` is tried so the rest can still
#              use the CPU extension; the build step stays failed)
#   info       python -m vlmkern info                             (versions, backends available and why not)
#   pytest     python -m pytest -m cuda                           (the cuda-marked tests, junit xml + log)
#   buildcheck python -m vlmkern.tools.gpu_build_check            (every shipped Triton config compiled for this GPU)
#   bench      python -m benchmarks.run --device cuda             (every benchmark; JSON/CSV/PNG per op)
# Exit status: 0 when every step passed, else 1. Summary: benchmarks/results/gpu_suite_summary.txt.
#
# Environment: PYTHON (default python3); VLMKERN_SUITE_QUICK=1 adds --quick to the benchmarks;
# VLMKERN_GIT_COMMIT records the commit in the benchmark JSON when the copy has no .git;
# per-step limits in seconds: VLMKERN_T_BUILD (150) VLMKERN_T_PYTEST (90) VLMKERN_T_CHECK (60) VLMKERN_T_BENCH (180).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
SUMMARY="$RES/gpu_suite_summary.txt"
SUITE_START=$(date +%s)
FAILED=()
: > "$SUMMARY"

# Cut nvcc time: build only for the GPU that is here (unless the caller chose the archs), and make a CUDA
# extension that setup.py would skip with a warning a failed step instead.
ARCH=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null | tail -n 1)
if [[ "$ARCH" =~ ^[0-9]+\.[0-9]+$ ]]; then
    export VLMKERN_CUDA_ARCHS=${VLMKERN_CUDA_ARCHS:-$ARCH} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $RES/gpu_suite_NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$RES/gpu_suite_${name}.log" t0 rc
    t0=$(date +%s)
    echo "=== [$name] (limit ${limit}s) $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 )) verdict=ok
    if [ "$rc" -ne 0 ]; then
        verdict="FAILED rc=$rc"
        { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && verdict="FAILED (timed out after ${limit}s)"
        FAILED+=("$name")
    fi
    printf '%-11s %-34s %4ss  %s\n' "$name" "$verdict" "$dt" "$*" | tee -a "$SUMMARY"
    return "$rc"
}

{
    echo "gpu suite started $(date -u +%FT%TZ) in $(pwd)"
    echo "commit: ${VLMKERN_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} | tee "$RES/gpu_suite_env.log"

if ! VLMKERN_REQUIRE_CUDA=1 step build "${VLMKERN_T_BUILD:-150}" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && [ -f setup.py ]; then
    step build_inplace "${VLMKERN_T_BUILD:-150}" "$PY" setup.py build_ext --inplace
fi
step info 60 "$PY" -m vlmkern info
step pytest "${VLMKERN_T_PYTEST:-90}" "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$RES/pytest_cuda.xml"
step buildcheck "${VLMKERN_T_CHECK:-60}" "$PY" -m vlmkern.tools.gpu_build_check --jobs "$MAX_JOBS" \
    --json "$RES/gpu_build_check.json"
BENCH_ARGS=(--device cuda --out "$RES")
[ "${VLMKERN_SUITE_QUICK:-0}" = "1" ] && BENCH_ARGS+=(--quick)
step bench "${VLMKERN_T_BENCH:-180}" "$PY" -m benchmarks.run "${BENCH_ARGS[@]}"

TOTAL=$(( $(date +%s) - SUITE_START ))
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "gpu suite: all steps passed in ${TOTAL}s" | tee -a "$SUMMARY"
else
    echo "gpu suite: FAILED steps: ${FAILED[*]} (${TOTAL}s)" | tee -a "$SUMMARY"
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp -r "$RES"/. "$OUT/results/" && echo "copied $RES to $OUT/results"
fi
[ "${#FAILED[@]}" -eq 0 ]
