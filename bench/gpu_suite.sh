#!/usr/bin/env bash
# The GPU benchmark suite: the one command to run on the GPU machine (H100, no network).
#
#   bash bench/gpu_suite.sh [STEP ...]
#
# Every step installs the package (pip --no-deps --no-build-isolation -e .; seconds) and then runs one
# piece, each sized to fit the 10-minute limit of one command on the lent GPU machine (and cut at
# STEP_TIMEOUT seconds, default 570, so that a slow step ends cleanly; results are written after every
# shape, so a cut step keeps what it timed). Results merge into bench/results/<date>_<device>.json (.md,
# .png); logs go to bench/results/<date>_<device>_<step>.log. Run the steps one command each:
#
#   tests        pytest -m gpu (the GPU tests), log only
#   model-b1     eomt-fast bench: EoMT-L/640, bf16, batch 1, masking off and on:
#                eomt_fast, transformers eager / sdpa / torch.compile (default mode)
#   model-b8     the same at batch 8
#   autotune-b1  transformers under torch.compile(mode="max-autotune"), batch 1 (compiling takes minutes)
#   autotune-b8  the same at batch 8
#   attention    bench/bench_attention.py        (EoMT-L/640 shapes: --filter eomt-l-640)
#   mlp          bench/bench_layernorm_mlp.py    (EoMT-L/640 shapes)
#   linear       bench/bench_linear.py           (EoMT-L/640 shapes)
#   masks        bench/bench_mask_logits.py and bench/bench_upscale.py (EoMT-L/640 shapes)
#   all          every step above in order (about 30-60 minutes: only where no per-command limit applies)
#
# Without .git on the GPU machine, pass the commit: EOMT_FAST_COMMIT=$(git rev-parse HEAD) (expanded where
# the command is written). KERNEL_FILTER=eomt-l (or empty) widens the kernel steps to more model shapes;
# KERNEL_EXTRA adds arguments to the kernel scripts (KERNEL_EXTRA="--quick --no-compile" on a CPU);
# SKIP_INSTALL=1 skips the pip install (a machine where the package is installed already).
#
# On the lent GPU machine each command gets a fresh copy of the working tree and only what is written
# under $OUT comes back: when $OUT is set, every step copies this device's results and logs to
# $OUT/bench/results/. Copy them into bench/results/ here before the next step, so that they travel with
# the working tree and the next step merges into them. Without matplotlib there, no .png is drawn: run
# `python bench/harness.py render bench/results/<date>_<device>.json` here afterwards.
#
#   run: EOMT_FAST_COMMIT=<sha> bash bench/gpu_suite.sh model-b1      (one step per command)
#
# Python runs with -P for `-m` commands: the repository root must not be on sys.path, where kernels/ would
# shadow the `kernels` package transformers probes for (and refuse to be imported under that name).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-570}
KERNEL_FILTER=${KERNEL_FILTER-eomt-l-640}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(all)
ALL=(tests model-b1 model-b8 autotune-b1 autotune-b8 attention mlp linear masks)
MODEL=(-P -m eomt_fast.cli bench --model eomt-l-640 --dtype bfloat16 --masking both)
COMPILE_DEFAULT=(--impls eomt_fast transformers-eager transformers-sdpa transformers-compile)
KERNEL_ARGS=()
[ -n "$KERNEL_FILTER" ] && KERNEL_ARGS=(--filter "$KERNEL_FILTER")
# extra arguments for the kernel scripts, e.g. KERNEL_EXTRA="--quick --no-compile" to smoke-test on a CPU
read -r -a EXTRA <<< "${KERNEL_EXTRA:-}"
KERNEL_ARGS+=("${EXTRA[@]}")

install() {
    [ -n "${SKIP_INSTALL:-}" ] && return 0
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "install failed" >&2; exit 2; }
}

run_step() {
    local step=$1 log rc
    log="bench/results/$("$PY" bench/harness.py slug)_${step}.log"
    echo "=== $step -> $log"
    local start=$SECONDS
    {
        case $step in
            tests)       timeout "$STEP_TIMEOUT" "$PY" -P -m pytest -m gpu -q -rs ;;
            model-b1)    timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --batch 1 "${COMPILE_DEFAULT[@]}" ;;
            model-b8)    timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --batch 8 "${COMPILE_DEFAULT[@]}" ;;
            autotune-b1) timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --batch 1 --impls transformers-compile-max-autotune ;;
            autotune-b8) timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --batch 8 --impls transformers-compile-max-autotune ;;
            attention)   timeout "$STEP_TIMEOUT" "$PY" bench/bench_attention.py "${KERNEL_ARGS[@]}" ;;
            mlp)         timeout "$STEP_TIMEOUT" "$PY" bench/bench_layernorm_mlp.py "${KERNEL_ARGS[@]}" ;;
            linear)      timeout "$STEP_TIMEOUT" "$PY" bench/bench_linear.py "${KERNEL_ARGS[@]}" ;;
            masks)       timeout $((STEP_TIMEOUT / 2)) "$PY" bench/bench_mask_logits.py "${KERNEL_ARGS[@]}"
                         first=$?
                         timeout $((STEP_TIMEOUT / 2)) "$PY" bench/bench_upscale.py "${KERNEL_ARGS[@]}"
                         second=$?
                         [ $first -eq 0 ] && [ $second -eq 0 ] ;;
        esac
    } 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "=== $step: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    if [ -n "${OUT:-}" ]; then  # the lent machine returns only what is under $OUT
        mkdir -p "$OUT/bench/results"
        cp "bench/results/$("$PY" bench/harness.py slug)"* "$OUT/bench/results/" 2>/dev/null
    fi
    return "$rc"
}

for step in "${STEPS[@]}"; do
    case " ${ALL[*]} all " in
        *" $step "*) ;;
        *) echo "unknown step $step; steps: ${ALL[*]} all" >&2; exit 2 ;;
    esac
done
mkdir -p bench/results
install
status=0
for step in "${STEPS[@]}"; do
    if [ "$step" = all ]; then
        for s in "${ALL[@]}"; do run_step "$s" || status=1; done
    else
        run_step "$step" || status=1
    fi
done
exit $status
