#!/usr/bin/env bash
# The GPU lease check: everything that matters on a CUDA GPU in one command under a hard deadline, for a machine lent
# for one short call (about 8 minutes, at most 8 files back). The longer bench/gpu_check.sh stays for machines
# without such limits. docs/gpu-lease.md says how to run it, how to make and carry the prebuilt artifacts, and what
# comes back.
#
#   bash bench/lease_check.sh [--smoke] [--deadline S] OUT_DIR     # OUT_DIR, else $OUT
#
# Steps, in this order, each under `timeout` of the smaller of its cap and the time left before the deadline:
#   a setup     the prebuilt extension and Triton cache (.lease_prebuilt/spvit_gpu_prebuilt.tar.gz, or
#               LEASE_PREBUILT) when present and the extension loads with its CUDA kernel, else a build with all
#               cores (cap LEASE_BUILD_S); the environment (GPU, driver, versions, TRITON_* variables)
#   b ops       tests/test_gpu_ops.py (every op at real sizes against fp64) with pytest-xdist, -v, a per-test
#               timeout and junit
#   c ratios    the supernet step fused vs eager (DeiT-S, batch 256, bf16) and the deployed SPViT-DeiT-B vs the eager
#               pruned model vs dense DeiT-B (batch 256, bf16), providers interleaved, each row written when measured
#   d sanitize  compute-sanitizer memcheck over bench/lease/sanitize_ops.py; racecheck of the backward if time is left
#   e fill      per-kernel rows, the other CUDA op tests, the DeiT-B step, batch 1 inference, a torch.compile row
#               when its estimated compile time fits
# OUT_DIR holds at most 8 files at any moment: summary.md, summary.json, lease_results.tar.gz (every finished step's
# log, env.txt, steps.tsv, junit files, the rows), rows.jsonl (every measured row, appended as measured) and the log
# of the step that is running (moved into the archive when it ends). The archive and the summaries are rewritten
# after every step, so a kill at any moment leaves all that was done. One status line per step on stdout.
#
# --smoke (or LEASE_SMOKE=1): on the CPU with tiny shapes, the Triton kernels under the interpreter
# (TRITON_INTERPRET=1): checks the command itself, measures nothing.
# Environment: LEASE_DEADLINE_S (default 490), LEASE_CAP_A/B/C/D/E (step caps, s), LEASE_BUILD_S (240),
# LEASE_SKIP="b d" (skip steps), LEASE_PREBUILT (the packed artifacts), LEASE_TESTS_N (xdist workers, default 8 on a
# GPU), LEASE_TEST_TIMEOUT (per test, s), PYTHON (default python3, else python), LEASE_TEST_STALL=<step letter> (for
# the tests of this script: that step waits after its first measured row until its time limit kills it).
# Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE="${LEASE_SMOKE:-0}"
DEADLINE_S="${LEASE_DEADLINE_S:-490}"
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --deadline) shift; DEADLINE_S="${1:-}" ;;
        --deadline=*) DEADLINE_S="${1#--deadline=}" ;;
        -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "lease_check: error: unknown option $1" >&2; exit 2 ;;
        *) [ -n "$OUT_DIR" ] && { echo "lease_check: error: one OUT_DIR only" >&2; exit 2; }; OUT_DIR="$1" ;;
    esac
    shift
done
OUT_DIR="${OUT_DIR:-${OUT:-}}"
[ -n "$OUT_DIR" ] || { echo "lease_check: error: give OUT_DIR (or set OUT)" >&2; exit 2; }
case "$DEADLINE_S" in ''|*[!0-9]*) echo "lease_check: error: the deadline must be whole seconds, got '$DEADLINE_S'" >&2
    exit 2 ;; esac
mkdir -p "$OUT_DIR" || { echo "lease_check: error: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; then
    echo "lease_check: error: $OUT_DIR is not empty (nothing there is overwritten)" >&2
    exit 2
fi

T0=$(date +%s)
T_END=$((T0 + DEADLINE_S))
RESERVE=4  # seconds kept for the last archive and summary
WORK="$(mktemp -d "${TMPDIR:-/tmp}/spvit_lease.XXXXXX")"
mkdir -p "$WORK/logs"
ROWS="$OUT_DIR/rows.jsonl"
: > "$ROWS"
STEPS="$WORK/steps.tsv"
: > "$STEPS"
EVENTS="$WORK/triton_events.jsonl"
SKIP=" ${LEASE_SKIP:-} "
FAILED=0
cd "$REPO" || exit 1

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LEASE_ROWS="$ROWS" LEASE_TRITON_EVENTS="$EVENTS"
# one pinned config of each autotuned kernel (no autotuning compiles inside the deadline); SPVIT_AUTOTUNE=1 to time
# the autotuned path
export SPVIT_AUTOTUNE="${SPVIT_AUTOTUNE:-0}"
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SMOKE_ARG="--smoke"
    CAP_A="${LEASE_CAP_A:-60}"; CAP_B="${LEASE_CAP_B:-90}"; CAP_C="${LEASE_CAP_C:-120}"
    CAP_D="${LEASE_CAP_D:-90}"; CAP_E="${LEASE_CAP_E:-120}"
else
    SMOKE_ARG=""
    CAP_A="${LEASE_CAP_A:-20}"; CAP_B="${LEASE_CAP_B:-150}"; CAP_C="${LEASE_CAP_C:-120}"
    CAP_D="${LEASE_CAP_D:-60}"; CAP_E="${LEASE_CAP_E:-400}"
fi
BUILD_S="${LEASE_BUILD_S:-240}"
NPROC="$(nproc 2>/dev/null || echo 4)"

if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
[ -n "$CUDA_HOME" ] && export PATH="$CUDA_HOME/bin:$PATH"

say() { echo "[lease $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( T_END - $(date +%s) - RESERVE )); }

# archive: every finished step's log and the work files, then the summaries; written beside and moved into place
write_outputs() {
    cp "$ROWS" "$WORK/rows.jsonl" 2>/dev/null
    tar -czf "$OUT_DIR/.lease_results.tar.gz.part" -C "$WORK" --exclude=prebuilt --exclude=triton_cache . \
        2>/dev/null \
        && mv -f "$OUT_DIR/.lease_results.tar.gz.part" "$OUT_DIR/lease_results.tar.gz"
    "$PY" -m bench.lease.summary --work "$WORK" --out "$OUT_DIR" --t0 "$T0" --deadline "$DEADLINE_S" \
        --smoke "$SMOKE" >/dev/null 2>"$WORK/logs/summary.err" || say "summary: FAILED (see logs/summary.err)"
}

# run_step LETTER NAME CAP CMD...: CMD under timeout min(CAP, time left), its output in OUT_DIR/step_<letter>.log
# while it runs (then in the archive); one status line; the archive and summaries rewritten after it
run_step() {
    local letter="$1" name="$2" cap="$3" rc start wall status lim logf
    shift 3
    logf="$OUT_DIR/step_${letter}_${name}.log"
    if [[ "$SKIP" == *" $letter "* ]]; then
        printf '%s\t%s\tskipped\t-\t0\t0\t-\n' "$letter" "$name" >> "$STEPS"
        say "step $letter $name: skipped (LEASE_SKIP)"
        write_outputs
        return 0
    fi
    lim=$(left)
    [ "$cap" -lt "$lim" ] && lim="$cap"
    if [ "$lim" -lt 3 ]; then
        printf '%s\t%s\tnot run (deadline)\t-\t0\t0\t-\n' "$letter" "$name" >> "$STEPS"
        say "step $letter $name: not run, the deadline is reached"
        FAILED=1
        write_outputs
        return 0
    fi
    start=$(date +%s)
    export LEASE_STEP_END=$((start + lim))
    {
        echo "# step $letter $name, limit ${lim} s, $(date -Iseconds)"
        echo "# $*"
    } > "$logf"
    LEASE_STEP="$letter" timeout -k 5 "$lim" "$@" >> "$logf" 2>&1
    rc=$?
    wall=$(( $(date +%s) - start ))
    case "$rc" in
        0) status=pass ;;
        124|137) status="killed (time limit ${lim} s)"; FAILED=1 ;;
        *) status=FAIL; FAILED=1 ;;
    esac
    echo "# exit $rc after ${wall} s: $status" >> "$logf"
    mv -f "$logf" "$WORK/logs/"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$letter" "$name" "$status" "$rc" "$wall" "$lim" \
        "logs/$(basename "$logf")" >> "$STEPS"
    say "step $letter $name: $status (exit $rc, ${wall} s of ${lim} s)"
    tail -n 4 "$WORK/logs/$(basename "$logf")" | sed 's/^/    /'
    write_outputs
    return 0
}

# ------------------------------------------------------------------------------------------------------ a: setup
step_setup() {
    "$PY" -m bench.lease.env_setup setup "$WORK" "${LEASE_PREBUILT:-$REPO/.lease_prebuilt/spvit_gpu_prebuilt.tar.gz}" \
        $([ "$SMOKE" = 1 ] && echo --cpu)
}

build_ext() {
    echo "building the extension with $NPROC jobs (CUDA_HOME=${CUDA_HOME:-none})"
    "$PY" -m bench.lease.env_setup keep-aside \
        && MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace && rm -f "$WORK/need_build" \
        && "$PY" -m bench.lease.env_setup ext-check $([ "$SMOKE" = 1 ] && echo --cpu)
}
export -f step_setup build_ext
export REPO WORK PY SMOKE NPROC

say "spvit lease check: deadline ${DEADLINE_S} s, out $OUT_DIR, work $WORK$([ "$SMOKE" = 1 ] && echo ', smoke (CPU)')"
run_step a setup "$CAP_A" bash -c step_setup
if [ -f "$WORK/need_build" ]; then
    if [ "$SMOKE" = 1 ]; then
        say "step a: the extension is missing; smoke runs do not build it (the ext rows fail or are skipped)"
    else
        run_step a2 build "$BUILD_S" bash -c build_ext
    fi
fi
# the prebuilt Triton cache, when step a unpacked one
[ -f "$WORK/prebuilt/lease_env.sh" ] && . "$WORK/prebuilt/lease_env.sh"
if [ -z "${TRITON_CACHE_DIR:-}" ]; then
    export TRITON_CACHE_DIR="$WORK/triton_cache"
fi
echo "env TRITON_CACHE_DIR=$TRITON_CACHE_DIR (from step a on)" >> "$WORK/env.txt"

# ------------------------------------------------------------------------------------------------------ b: ops
PYTEST_COMMON=(-p no:cacheprovider -p bench.lease.triton_probe -rfEs)
export LEASE_TEST_TIMEOUT="${LEASE_TEST_TIMEOUT:-$([ "$SMOKE" = 1 ] && echo 60 || echo 90)}"
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_COMMON+=(--timeout "$LEASE_TEST_TIMEOUT") limit_from=pytest-timeout
else  # the same limit from faulthandler's watchdog (it also ends a test stuck in C code)
    PYTEST_COMMON+=(-p bench.lease.per_test_timeout) limit_from=bench/lease/per_test_timeout.py
fi
echo "per-test time limit: $LEASE_TEST_TIMEOUT s ($limit_from)" >> "$WORK/env.txt"
XDIST=()
N_WORKERS="${LEASE_TESTS_N:-$([ "$SMOKE" = 1 ] && echo 0 || echo 8)}"
if [ "$N_WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$N_WORKERS" --dist load)
fi
if [ "$SMOKE" = 1 ]; then
    OPS_TESTS=(tests/test_gpu_ops.py "tests/test_shift_sum.py::test_tap_order_matches_reference")
else
    OPS_TESTS=(tests/test_gpu_ops.py)
fi
run_step b ops "$CAP_B" "$PY" -m pytest -v "${PYTEST_COMMON[@]}" "${XDIST[@]}" --junitxml="$WORK/junit_ops.xml" \
    "${OPS_TESTS[@]}"

# ------------------------------------------------------------------------------------------------------ c: ratios
lim_c=$(left); [ "$CAP_C" -lt "$lim_c" ] && lim_c="$CAP_C"
run_step c ratios "$CAP_C" "$PY" -m bench.lease.ratios $SMOKE_ARG --budget-s $(( lim_c * 3 / 4 ))

# ------------------------------------------------------------------------------------------------------ d: sanitize
step_sanitize() {
    local san="" dev=cuda
    [ "$SMOKE" = 1 ] && dev=cpu
    san="$(command -v compute-sanitizer || true)"
    [ -z "$san" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && \
        san="$CUDA_HOME/bin/compute-sanitizer"
    if [ "$SMOKE" = 1 ] || [ -z "$san" ]; then
        echo "compute-sanitizer: $([ -z "$san" ] && echo 'not found' || echo 'not used in a smoke run');" \
             "the cases run without it (their results are still checked)"
        "$PY" -m bench.lease.sanitize_ops --device "$dev"
        return $?
    fi
    echo "== memcheck ($san)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 86 \
        "$PY" -m bench.lease.sanitize_ops --device cuda
    local rc=$?
    if [ "$rc" = 2 ]; then
        echo "memcheck: the extension is not loaded: nothing to check"
        return 2
    fi
    if [ "$rc" != 0 ] && [ "$rc" != 86 ] && [ "$rc" != 1 ]; then
        echo "memcheck: the sanitizer could not run the device (exit $rc): recorded, not fatal"
        return 0
    fi
    if [ $(( ${LEASE_STEP_END:-0} - $(date +%s) )) -lt 25 ]; then
        echo "racecheck: skipped, too little time left in this step"
        return "$rc"
    fi
    echo "== racecheck of the backward"
    "$san" --tool racecheck --error-exitcode 86 "$PY" -m bench.lease.sanitize_ops --device cuda --only-backward \
        || echo "racecheck: exit $? (86: a race was reported)"
    return "$rc"
}
export -f step_sanitize
run_step d sanitize "$CAP_D" bash -c step_sanitize

# ------------------------------------------------------------------------------------------------------ e: fill
# what is left, in this order: the per-kernel rows (a quarter of it), the other CUDA op tests (a third of the rest),
# then the DeiT-B step, batch 1 inference and the torch.compile row until the deadline
step_cap() {  # step_cap CAP FRACTION_PERCENT: min(CAP, time left) * FRACTION / 100
    local l; l=$(left); [ "$1" -lt "$l" ] && l="$1"; echo $(( l * $2 / 100 ))
}
if [ "$SMOKE" = 1 ]; then
    lim_e=$(step_cap "$CAP_E" 100)
    run_step e fill "$lim_e" "$PY" -m bench.lease.fill --smoke --budget-s $(( lim_e * 4 / 5 ))
else
    lim_e=$(step_cap "$CAP_E" 25)
    run_step e1 kernels "$lim_e" "$PY" -m bench.lease.fill --parts kernels --budget-s $(( lim_e * 4 / 5 ))
    run_step e2 optests "$(step_cap "$CAP_E" 33)" "$PY" -m pytest -v "${PYTEST_COMMON[@]}" "${XDIST[@]}" \
        --junitxml="$WORK/junit_optests.xml" tests/test_shift_sum.py tests/test_deploy_conv.py \
        tests/test_masked_ffn.py tests/test_pruned_ffn.py tests/test_gated_attn_conv.py \
        tests/test_gated_attn_conv_window.py tests/test_deploy_conv_stage_maps.py tests/test_op_contract.py
    lim_e=$(step_cap "$CAP_E" 100)
    run_step e3 fill "$lim_e" "$PY" -m bench.lease.fill --parts step_b,infer_b1,compiled \
        --budget-s $(( lim_e * 4 / 5 ))
fi

write_outputs
say "done in $(( $(date +%s) - T0 )) s: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL); results in $OUT_DIR"
cat "$OUT_DIR/summary.md" 2>/dev/null | sed -n '1,60p'
rm -rf "$WORK"
[ "$FAILED" = 0 ]
