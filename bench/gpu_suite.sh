#!/usr/bin/env bash
# The GPU benchmark suite: the one command to run on the GPU machine (an H100 or H200, no network).
#
#   bash bench/gpu_suite.sh [STEP ...]
#
# Every step installs the package (pip --no-deps --no-build-isolation -e .; seconds) and then runs one
# piece, each sized to fit the 10-minute limit of one command on the lent GPU machine (and cut at
# STEP_TIMEOUT seconds, default 570, so that a slow step ends cleanly; results are written after every
# shape, so a cut step keeps what it timed). Results merge into bench/results/<date>_<device>.json (.md,
# .png); logs go to bench/results/<date>_<device>_<step>.log. Run the steps one command each:
#
#   first-look     for a session with only minutes of GPU time (one command, the first to run; all of it,
#                  install included, within FIRST_LOOK_TIMEOUT s of the script's start, default 480, and
#                  copied to $OUT after each command): the GPU tests as in `tests` (cut at half that time,
#                  slowest 25 listed), then eomt-fast bench on EoMT-L/640, bf16, masking off, batch 1 and 8:
#                  eomt_fast, eomt_fast with CUDA graphs and transformers-sdpa, each timed by do_bench (25
#                  calls or more, at most 5 s; --budget counts on CPUs only), in what is left; then, while at
#                  least 60 s are left, cut where the time ends: profile (about a minute), mlp, linear and
#                  upscale without torch.compile (seconds a shape; upscale: the ConvTranspose through the shared
#                  GEMM and the tuned depthwise segment, new on 2026-12-06), then mlp with it (max-autotune
#                  compiles for minutes)
#   tests          pytest -m gpu (the GPU tests) except tests/test_model_gpu.py, log only (8 processes, each
#                  test cut at 240 s, where pytest-xdist and pytest-timeout are installed: see GPU_TESTS)
#   model-tests    pytest -m gpu tests/test_model_gpu.py: ViT-S/B/L models end to end against transformers,
#                  CUDA graphs, torch.compile, peak memory (builds random ViT-L models: minutes), log only
#                  (4 processes, 480 s a test)
#   check-kernels  eomt-fast check-kernels: every Triton kernel compiled for sm_80 and sm_90, log only
#   model-b1       eomt-fast bench, bf16, batch 1, masking off and on, for ViT-L, ViT-S and ViT-B at 640
#                  (one command each, L first; each gets what is left of the step's time):
#                  eomt_fast, eomt_fast with CUDA graphs, transformers eager / sdpa / torch.compile (default
#                  mode); every row with its peak CUDA memory (MiB)
#   model-b8       the same at batch 8 (with model-b1: ViT-L/640 at batch 1 and 8, time and peak memory)
#   profile        bench/profile_host.py: where the host time of an eager EoMT-L/640 forward (bf16, batch 1)
#                  goes (cProfile, torch.profiler, against its CUDA-graph replay), into <date>_<device>_profile_host.txt
#   autotune-b1    transformers under torch.compile(mode="max-autotune"), EoMT-L/640, batch 1 (compiling
#                  takes minutes)
#   autotune-b8    the same at batch 8
#   e2e            eomt-fast bench --e2e: a decoded 640x480 image -> panoptic segments, batch 1 and 8, bf16,
#                  eomt_fast (its processor + model on the GPU) against transformers' EomtImageProcessor +
#                  EomtForUniversalSegmentation + post_process_panoptic_segmentation (ViT-L, then ViT-S)
#   attention      bench/bench_attention.py        (EoMT-L/640 shapes: --filter eomt-l-640; SDPA backends,
#                                                   the dense mask, FlexAttention with a block mask, Triton)
#   mlp            bench/bench_layernorm_mlp.py    (EoMT-L/640 shapes)
#   linear         bench/bench_linear.py           (EoMT-L/640 shapes; both print, under each kernel, the GEMM tile
#                                                   chosen per shape and each variant's best time: pointer loads,
#                                                   TMA, persistent TMA: "gemm M1805 N3072 K1024 ... -> ... (...)")
#   masks          bench/bench_mask_logits.py and bench/bench_upscale.py (EoMT-L/640 shapes; every kernel
#                  script prints the other autotuners' choices too: "_dwconv_layernorm_kernel B=1 H=160 ... ->
#                  BLOCK_P: 2, SEGMENT: 8, ... (ms, next best ms; configs timed)")
#   predict        bench/bench_predict.py: the final predict() and a masked layer's mask, eomt_fast's op
#                  sequence against the reference ops (eager, max-autotune) and transformers' way (EoMT-L/640)
#   all            every step above but first-look, in order (about 60-90 minutes: only where no per-command
#                  limit applies)
#
# Pass the commit, expanded where the command is written: EOMT_FAST_COMMIT=<the 40 hex digits of git rev-parse
# HEAD here>. The GPU machine may have no .git, or a stale one: on 2026-12-04 `git rev-parse HEAD` there
# reported the commit the session had started from, not the one whose tree ran. MODELS (default "eomt-l-640 eomt-s-640 eomt-b-640") are the presets of the
# model steps, in order; E2E_MODELS (default "eomt-l-640 eomt-s-640") those of the e2e step.
# KERNEL_FILTER=eomt-l (or empty) widens the kernel steps to more model shapes; KERNEL_EXTRA adds arguments
# to the kernel scripts (KERNEL_EXTRA="--quick --no-compile" on a CPU); SKIP_INSTALL=1 skips the pip install
# (a machine where the package is installed already).
#
# On the lent GPU machine each command gets a fresh copy of the working tree and only what is written
# under $OUT comes back: when $OUT is set, every step copies this device's results and logs to
# $OUT/bench/results/. Copy them into bench/results/ here before the next step, so that they travel with
# the working tree and the next step merges into them. Without matplotlib there, no .png is drawn: run
# `python bench/harness.py render bench/results/<date>_<device>.json` here afterwards.
#
#   run: EOMT_FAST_COMMIT=<sha> bash bench/gpu_suite.sh model-b1      (one step per command)
#
# `-m` commands run with -P (the current directory is not put on sys.path). It is not needed any more: from
# the repository root, kernels/ would be found as a top-level `kernels`, and kernels/__init__.py then makes
# it an empty stray module, which transformers' probe for the Hugging Face `kernels` package reports as
# not available; -P just keeps the root off sys.path.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-570}
# first-look's whole run, install included, counted from the script's start: under the device's 600 s limit
# with room for a pytest's SIGKILL grace (30 s) and the copies to $OUT
FIRST_LOOK_TIMEOUT=${FIRST_LOOK_TIMEOUT:-480}
export PYTHONUNBUFFERED=1  # a command cut by timeout keeps the end of its log
KERNEL_FILTER=${KERNEL_FILTER-eomt-l-640}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(all)
ALL=(tests model-tests check-kernels model-b1 model-b8 profile autotune-b1 autotune-b8 e2e attention mlp linear masks predict)
STEP_NAMES=(first-look "${ALL[@]}" all)  # `all` runs ALL, which leaves first-look out
read -r -a MODELS <<< "${MODELS:-eomt-l-640 eomt-s-640 eomt-b-640}"
read -r -a E2E_MODELS <<< "${E2E_MODELS:-eomt-l-640 eomt-s-640}"
CLI=(-P -m eomt_fast.cli)
# The GPU tests. Where the GPU machine's image has pytest-xdist (it does: KINDS.md), they run in TEST_WORKERS
# processes (default 8; the GPU tests are mostly Triton compiling, one CPU core a kernel, and 16 cores are
# there), the model tests in MODEL_TEST_WORKERS (default 4); 0 or 1 runs them in one process. Where it has
# pytest-timeout, one test is cut after TEST_TIMEOUT s (default 240; MODEL_TEST_TIMEOUT 480) and fails with
# its stack instead of taking the step's time. A step's pytest is cut with SIGINT (then SIGKILL 30 s later):
# pytest then still prints the failures, their tracebacks and the summary of what ran (with SIGTERM it dies
# with nothing but its progress dots).
pytest_args() {  # $1: workers, $2: per-test timeout (s); prints the options, one a line
    if [ "${1:-0}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then printf '%s\n' -n "$1"; fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then printf '%s\n' --timeout "$2"; fi
}
mapfile -t TEST_OPTS < <(pytest_args "${TEST_WORKERS:-8}" "${TEST_TIMEOUT:-240}")
mapfile -t MODEL_TEST_OPTS < <(pytest_args "${MODEL_TEST_WORKERS:-4}" "${MODEL_TEST_TIMEOUT:-480}")
GPU_TESTS=(-P -m pytest -m gpu -q -rfEs "${TEST_OPTS[@]}" --ignore tests/test_model_gpu.py)  # `tests`; first-look starts with it
MODEL_TESTS=(-P -m pytest -m gpu -q -rfEs "${MODEL_TEST_OPTS[@]}" tests/test_model_gpu.py)
INT=(-s INT -k 30)  # timeout's options for a pytest: SIGINT, then SIGKILL
# The tests tune their kernels in 8 processes sharing one GPU: timings taken under that contention must not
# become the tiles the benchmarks after them use, so the tests keep no autotune cache (kernels/_autotune.py);
# the benchmark steps read and write it (a step's second model, or a later step, reuses the tiles timed alone).
NO_TUNING_CACHE=(env EOMT_FAST_AUTOTUNE_CACHE=0)
MODEL=("${CLI[@]}" bench --dtype bfloat16 --masking both)
COMPILE_DEFAULT=(--impls eomt_fast eomt_fast-cuda-graphs transformers-eager transformers-sdpa transformers-compile)
KERNEL_ARGS=()
[ -n "$KERNEL_FILTER" ] && KERNEL_ARGS=(--filter "$KERNEL_FILTER")
# extra arguments for the kernel scripts, e.g. KERNEL_EXTRA="--quick --no-compile" to smoke-test on a CPU
read -r -a EXTRA <<< "${KERNEL_EXTRA:-}"
KERNEL_ARGS+=("${EXTRA[@]}")

# run "$@" once per preset ($1: the presets' array name, the rest: the command before --model), each cut at
# what is left of the step's STEP_TIMEOUT; a preset with less than 30 s left is skipped. Fails if any failed.
per_model() {
    local -n presets=$1
    shift
    local rc=0 left preset
    for preset in "${presets[@]}"; do
        left=$((STEP_TIMEOUT - (SECONDS - step_start)))
        if [ "$left" -lt 30 ]; then
            echo "--- $preset skipped: ${left} s left of the step's ${STEP_TIMEOUT} s"
            rc=1
            continue
        fi
        echo "--- $preset (at most ${left} s)"
        timeout "$left" "$PY" "$@" --model "$preset" || rc=1
    done
    return $rc
}

# first-look's extras: run "$@" cut at what is left of the step's time, or skip it with less than 60 s left;
# its exit status is logged, not returned (being cut is expected: results are written after every shape)
with_what_is_left() {
    local left=$((STEP_TIMEOUT - (SECONDS - step_start)))
    if [ "$left" -lt 60 ]; then
        echo "--- skipped ($left s left): $*"
        return 0
    fi
    echo "--- at most $left s: $*"
    timeout "$left" "$@"
    echo "--- exit $?: $*"
    sync_out
}

# the seconds left of the step's time up to the fraction $1/$2 of it (default all), at least 1 (`timeout 0`
# would mean no limit)
seconds_left() {
    local left=$((STEP_TIMEOUT * ${1:-1} / ${2:-1} - (SECONDS - step_start)))
    echo $((left < 1 ? 1 : left))
}

# the lent machine returns only what is under $OUT, and nothing of a command cut at its limit that had not
# been copied there yet: first-look copies after each of its commands, every step at its end
sync_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/bench/results"
        cp "bench/results/$("$PY" bench/harness.py slug)"* "$OUT/bench/results/" 2>/dev/null
    fi
    return 0
}

install() {
    [ -n "${SKIP_INSTALL:-}" ] && return 0
    # no network there: --no-index, and no version check (its retries against PyPI would cost the run time)
    "$PY" -m pip install --quiet --no-index --disable-pip-version-check --no-deps --no-build-isolation -e . \
        || { echo "install failed" >&2; exit 2; }
}

run_step() {
    local step=$1 log rc
    log="bench/results/$("$PY" bench/harness.py slug)_${step}.log"
    echo "=== $step -> $log"
    step_start=$SECONDS
    local STEP_TIMEOUT=$STEP_TIMEOUT
    if [ "$step" = first-look ]; then  # its time counts from the script's start (the install included)
        step_start=0
        STEP_TIMEOUT=$FIRST_LOOK_TIMEOUT
    fi
    {
        case $step in
            first-look)  timeout "${INT[@]}" "$(seconds_left 1 2)" "${NO_TUNING_CACHE[@]}" "$PY" "${GPU_TESTS[@]}" --durations 25
                         first=$?
                         sync_out
                         timeout "$(seconds_left)" "$PY" "${CLI[@]}" bench --dtype bfloat16 \
                             --masking off --model eomt-l-640 --batch 1 8 --budget 3 \
                             --impls eomt_fast eomt_fast-cuda-graphs transformers-sdpa
                         second=$?
                         sync_out
                         with_what_is_left "$PY" bench/profile_host.py --model eomt-l-640 --batch 1 \
                             --out "bench/results/$("$PY" bench/harness.py slug)_profile_host.txt"
                         with_what_is_left "$PY" bench/bench_layernorm_mlp.py "${KERNEL_ARGS[@]}" --no-compile
                         with_what_is_left "$PY" bench/bench_linear.py "${KERNEL_ARGS[@]}" --no-compile
                         with_what_is_left "$PY" bench/bench_upscale.py "${KERNEL_ARGS[@]}" --no-compile
                         with_what_is_left "$PY" bench/bench_layernorm_mlp.py "${KERNEL_ARGS[@]}"
                         [ $first -eq 0 ] && [ $second -eq 0 ] ;;
            tests)       timeout "${INT[@]}" $((STEP_TIMEOUT - 30)) "${NO_TUNING_CACHE[@]}" "$PY" "${GPU_TESTS[@]}" --durations 25 ;;
            model-tests) timeout "${INT[@]}" $((STEP_TIMEOUT - 30)) "${NO_TUNING_CACHE[@]}" "$PY" "${MODEL_TESTS[@]}" --durations 25 ;;
            check-kernels) timeout "$STEP_TIMEOUT" "$PY" "${CLI[@]}" check-kernels ;;
            model-b1)    per_model MODELS "${MODEL[@]}" --batch 1 "${COMPILE_DEFAULT[@]}" ;;
            model-b8)    per_model MODELS "${MODEL[@]}" --batch 8 "${COMPILE_DEFAULT[@]}" ;;
            profile)     timeout "$STEP_TIMEOUT" "$PY" bench/profile_host.py --model eomt-l-640 --batch 1 \
                             --out "bench/results/$("$PY" bench/harness.py slug)_profile_host.txt" ;;
            autotune-b1) timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --model eomt-l-640 --batch 1 \
                             --impls transformers-compile-max-autotune ;;
            autotune-b8) timeout "$STEP_TIMEOUT" "$PY" "${MODEL[@]}" --model eomt-l-640 --batch 8 \
                             --impls transformers-compile-max-autotune ;;
            e2e)         per_model E2E_MODELS "${CLI[@]}" bench --e2e --task panoptic --dtype bfloat16 --batch 1 8 \
                             --budget 5 ;;
            attention)   timeout "$STEP_TIMEOUT" "$PY" bench/bench_attention.py "${KERNEL_ARGS[@]}" ;;
            mlp)         timeout "$STEP_TIMEOUT" "$PY" bench/bench_layernorm_mlp.py "${KERNEL_ARGS[@]}" ;;
            linear)      timeout "$STEP_TIMEOUT" "$PY" bench/bench_linear.py "${KERNEL_ARGS[@]}" ;;
            masks)       timeout $((STEP_TIMEOUT / 2)) "$PY" bench/bench_mask_logits.py "${KERNEL_ARGS[@]}"
                         first=$?
                         timeout $((STEP_TIMEOUT / 2)) "$PY" bench/bench_upscale.py "${KERNEL_ARGS[@]}"
                         second=$?
                         [ $first -eq 0 ] && [ $second -eq 0 ] ;;
            predict)     timeout "$STEP_TIMEOUT" "$PY" bench/bench_predict.py "${KERNEL_ARGS[@]}" ;;
        esac
    } 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "=== $step: exit $rc after $((SECONDS - step_start)) s" | tee -a "$log"
    sync_out
    return "$rc"
}

for step in "${STEPS[@]}"; do
    case " ${STEP_NAMES[*]} " in
        *" $step "*) ;;
        *) echo "unknown step $step; steps: ${STEP_NAMES[*]}" >&2; exit 2 ;;
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
