#!/usr/bin/env bash
# One-command GPU check of spvit: build and install, the whole test suite on CUDA, compute-sanitizer (memcheck) over
# the extension's tests, and the headline benchmark; every log and result goes into one folder. It needs 20-50
# minutes: for a GPU lent for one short call (about 8 minutes, at most 8 files back) use bench/lease_check.sh
# (docs/gpu-lease.md).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR, else $OUT, else ./gpu_check_results/<date-time>
#
# Needs (no network is used): a CUDA GPU, python with torch, triton, timm, pytest and ninja installed, nvcc (CUDA_HOME
# or nvcc on PATH or /usr/local/cuda) and compute-sanitizer. Run it from anywhere; it works in the repository it is in.
#
# Steps (a failed step is recorded and the next one still runs):
#   build      pip install --no-build-isolation --no-deps --no-index -e .  (builds spvit_kernels._C with CUDA), then a
#              check that the extension loaded and registered its CUDA kernel
#   tests      python -m pytest -q tests                     -> tests.log, junit.xml
#   memcheck   compute-sanitizer --tool memcheck over the extension's CUDA tests of tests/test_shift_sum.py and
#              tests/test_deploy_conv.py (-k "cuda and ext"; caching allocator off)   -> memcheck.log
#   headline   python bench/headline.py (pytest bench/ -m headline --benchmark-only)  -> headline/ (headline.json,
#              kernels.csv / e2e.csv rows, headline.md with the tables and the targets)
# Output: env.txt (GPU, driver, versions), one log per step, summary.md and summary.json (GPU name, driver, versions,
# date, status and wall time of every step). Exit status 0 only when every step passed.
#
# Time limits (seconds; environment overrides): GPU_CHECK_TOTAL_S=540 (the headline gets what is left of it, at least
# GPU_CHECK_HEADLINE_MIN_S=150), GPU_CHECK_BUILD_S=400, GPU_CHECK_TESTS_S=330, GPU_CHECK_MEMCHECK_S=200.
# GPU_CHECK_SKIP="tests memcheck" skips steps (recorded as skipped). PYTHON picks the interpreter (default python).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_results/$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-540}"
HEADLINE_MIN_S="${GPU_CHECK_HEADLINE_MIN_S:-150}"
BUILD_S="${GPU_CHECK_BUILD_S:-400}"
TESTS_S="${GPU_CHECK_TESTS_S:-330}"
MEMCHECK_S="${GPU_CHECK_MEMCHECK_S:-200}"
SKIP=" ${GPU_CHECK_SKIP:-} "
T0=$(date +%s)
FAILED=0
STEPS_TSV="$OUT_DIR/steps.tsv"
: > "$STEPS_TSV"
cd "$REPO" || exit 2

if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
        CUDA_HOME=/usr/local/cuda
    fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
[ -n "$CUDA_HOME" ] && export PATH="$CUDA_HOME/bin:$PATH"
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# ---------------------------------------------------------------------------------------------------- environment
{
    echo "date: $(date -Iseconds)"
    echo "host: $(uname -srm)"
    echo "repo: $REPO"
    if command -v git >/dev/null 2>&1 && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
        dirty="$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with local changes)')"
        echo "commit: $(git -C "$REPO" rev-parse HEAD)$dirty"
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
    else
        echo "gpu: nvidia-smi not found"
    fi
    echo "CUDA_HOME: ${CUDA_HOME:-not found}"
    echo "nvcc: $( { nvcc --version 2>&1 || echo 'not found'; } | tail -1)"
    if [ -n "$SANITIZER" ]; then
        echo "compute-sanitizer: $("$SANITIZER" --version 2>&1 | grep -i version | head -1)"
    else
        echo "compute-sanitizer: not found"
    fi
    echo "cpus: $(nproc 2>/dev/null || echo '?')"
    "$PY" - <<'EOF' 2>&1
import importlib, sys
print(f"python: {sys.version.split()[0]} ({sys.executable})")
for name in ("torch", "triton", "timm", "numpy", "torchvision", "yaml", "tqdm", "pytest", "ninja", "matplotlib"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:  # report, do not fail: the steps below say what it breaks
        print(f"{name}: MISSING ({type(exc).__name__})")
try:
    import torch
    print(f"torch.cuda: {torch.version.cuda}; available: {torch.cuda.is_available()}; "
          f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}; "
          f"capability: {torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '-'}")
except Exception as exc:
    print(f"torch.cuda: {exc}")
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"
GPU_LINE="$(grep '^gpu:' "$OUT_DIR/env.txt" | cut -d' ' -f2-)"

write_summary() {
    local now total
    now=$(date +%s)
    total=$((now - T0))
    {
        echo "# spvit GPU check"
        echo
        echo "$(date -Iseconds); GPU: $GPU_LINE"
        echo
        echo '```'
        cat "$OUT_DIR/env.txt"
        echo '```'
        echo
        echo "| step | status | exit code | wall s | log |"
        echo "|---|---|---|---|---|"
        while IFS=$'\t' read -r name status rc wall logf; do
            echo "| $name | $status | $rc | $wall | $logf |"
        done < "$STEPS_TSV"
        echo
        echo "Total wall time: ${total} s. Overall: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
    } > "$OUT_DIR/summary.md"
}

# run_step NAME TIMEOUT_S LOGFILE CMD...: run CMD with a time limit, its output into LOGFILE; record status and time
run_step() {
    local name="$1" limit="$2" logf="$3" rc start wall status
    shift 3
    if [[ "$SKIP" == *" $name "* ]]; then
        log "$name: skipped (GPU_CHECK_SKIP)"
        printf '%s\tskipped\t-\t0\t-\n' "$name" >> "$STEPS_TSV"
        write_summary
        return 0
    fi
    log "$name: $* (limit ${limit} s, log $(basename "$logf"))"
    start=$(date +%s)
    timeout -k 20 "$limit" "$@" > "$logf" 2>&1
    rc=$?
    wall=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then
        status=pass
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="FAIL (time limit ${limit} s)"
        FAILED=1
    else
        status=FAIL
        FAILED=1
    fi
    log "$name: $status (exit $rc, ${wall} s)"
    tail -n 5 "$logf" | sed 's/^/    /'
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$(basename "$logf")" >> "$STEPS_TSV"
    write_summary
    return 0
}

# ---------------------------------------------------------------------------------------------------------- steps
build_and_check() {
    MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}" "$PY" -m pip install --no-build-isolation --no-deps \
        --no-index -v -e "$REPO" || return 1
    "$PY" - <<'EOF'
import torch
from spvit_kernels import _ext
print(f"spvit_kernels._C loaded: {_ext.available()} {_ext.error() or ''}")
cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("spvit::shift_sum", "CUDA")
print(f"spvit::shift_sum has a CUDA kernel: {cuda_kernel}")
if not (_ext.available() and _ext.has_op("shift_sum") and cuda_kernel):
    raise SystemExit("the extension was not built with its CUDA kernels")
x = torch.randn(2, 12, 9, 8, device="cuda")
from spvit_kernels import reference
from spvit_kernels.shift_sum import shift_sum_ext
torch.testing.assert_close(shift_sum_ext(x, None, (3, 4), True), reference.shift_sum(x, None, (3, 4), True))
print("shift_sum on CUDA matches the reference")
EOF
}

export -f build_and_check
export PY REPO
run_step build "$BUILD_S" "$OUT_DIR/build.log" bash -c build_and_check

run_step tests "$TESTS_S" "$OUT_DIR/tests.log" \
    "$PY" -m pytest -q -rfEs --durations=20 -p no:cacheprovider --junitxml="$OUT_DIR/junit.xml" tests

if [ -n "$SANITIZER" ] || [[ "$SKIP" == *" memcheck "* ]]; then
    run_step memcheck "$MEMCHECK_S" "$OUT_DIR/memcheck.log" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --target-processes all --error-exitcode 1 \
        "$PY" -m pytest -q -x -p no:cacheprovider --junitxml="$OUT_DIR/memcheck_junit.xml" \
        tests/test_shift_sum.py tests/test_deploy_conv.py -k "cuda and ext"
else
    echo "compute-sanitizer not found (PATH, CUDA_HOME)" > "$OUT_DIR/memcheck.log"
    printf 'memcheck\tFAIL (compute-sanitizer not found)\t-\t0\tmemcheck.log\n' >> "$STEPS_TSV"
    FAILED=1
    write_summary
fi

ELAPSED=$(( $(date +%s) - T0 ))
LEFT=$(( TOTAL_S - ELAPSED - 30 ))
[ "$LEFT" -lt "$HEADLINE_MIN_S" ] && LEFT="$HEADLINE_MIN_S"
# the benchmark starts no new item after BUDGET s; the step limit leaves room for the item running then
BUDGET=$(( LEFT * 4 / 5 ))
run_step headline $(( LEFT + 60 )) "$OUT_DIR/headline.log" \
    "$PY" "$REPO/bench/headline.py" --out "$OUT_DIR/headline" --budget-s "$BUDGET" -- --bench-device cuda \
    -k "not (test_kernel and compiled)"  # per-op torch.compile rows: one inductor compile each, left to the full suite

write_summary
"$PY" - "$OUT_DIR" "$GPU_LINE" "$FAILED" "$T0" <<'EOF' || true
import json, os, sys, time
out, gpu, failed, t0 = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
env = {}
with open(os.path.join(out, "env.txt")) as f:
    for line in f:
        k, _, v = line.rstrip("\n").partition(": ")
        env[k] = v
steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, status, rc, wall, logf = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "exit_code": rc, "wall_s": int(wall), "log": logf})
json.dump({"gpu": gpu, "env": env, "steps": steps, "total_wall_s": int(time.time()) - t0,
           "overall": "FAIL" if failed else "PASS"}, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
cat "$OUT_DIR/summary.md"
log "results in $OUT_DIR"
[ "$FAILED" = 0 ] && exit 0 || exit 1
