#!/usr/bin/env bash
# nnscope vs transformers vs nnsight, side by side, in one command. See bench/README.md.
#
#   bench/run.sh            # full run, writes bench/RESULTS.md (about 30-35 minutes on 2 cores)
#
# Environment:
#   BENCH_THREADS   threads for every contender (default 2)
#   BENCH_PYTHON    a Python that already has torch, transformers, nnsight, safetensors (skips the venv)
#   BENCH_ITERS     timed iterations for batch 1 (default 10; batch 8 uses half, at least 3)
#   BENCH_WARMUP    warm-up iterations (default 2)
#   BENCH_ROUNDS    rounds over all measurements (default 2); the report keeps each one's best round,
#                   so a burst of load from other processes spoils at most one round
#   BENCH_MODELS    checkpoints to run in float32 (default "gpt2 llama"; "" = none)
#   BENCH_FEATURES  cargo features for nnscope's matmul kernel. Default "dnnl" (oneDNN, installed with
#                   apt-get when missing and run as root); "" = candle's own kernel; "openblas".
#   BENCH_BF16_MODELS  checkpoints also timed in bfloat16 at 1x16, 1x128, 8x128 (default "llama"; "" = none)
#   BENCH_7B=1      also write a 7B-shaped bfloat16 LLaMA (13.5 GB) and time a 32-token forward of it:
#                   nnscope plain and traced, transformers eager, nnsight traced (one process each)
#   BENCH_7B_WARMUP warm-up forwards of the 7B row (default 1; one timed forward after them)
#   BENCH_SUITE     what to measure: "forward generate" (default), "forward" or "generate"
#                   (generate: greedy generation, 128-token prompt + 32 new tokens, batch 1 and 8)
#   BENCH_TORCH_INDEX  a pip index URL for torch (default: the default package index)
#   BENCH_TRANSFORMERS, BENCH_NNSIGHT  versions pinned in the venv (default 5.24.0 and 0.8.1)
#   CARGO_TARGET_DIR  honoured (the bench binaries are copied out of it)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WORK="$HERE/work"
mkdir -p "$WORK"

THREADS="${BENCH_THREADS:-2}"
ITERS="${BENCH_ITERS:-10}"
WARMUP="${BENCH_WARMUP:-2}"
ROUNDS="${BENCH_ROUNDS:-2}"
MODELS="${BENCH_MODELS-gpt2 llama}"
SUITE="${BENCH_SUITE:-forward generate}"
FEATURES="${BENCH_FEATURES-dnnl}"
BF16_MODELS="${BENCH_BF16_MODELS-llama}"
WARMUP_7B="${BENCH_7B_WARMUP:-1}"
# The Python side is pinned (the versions issue 10's numbers were taken with); torch is the newest on
# the default index.
PIN_TRANSFORMERS="${BENCH_TRANSFORMERS:-5.24.0}"
PIN_NNSIGHT="${BENCH_NNSIGHT:-0.8.1}"
# The same thread count for everyone: candle (rayon + gemm), torch (OpenMP / intra-op), BLAS.
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" \
    OPENBLAS_NUM_THREADS="$THREADS"
export TOKENIZERS_PARALLELISM=false

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }

# --- Python side -----------------------------------------------------------------------------
if [[ -n "${BENCH_PYTHON:-}" ]]; then
    PY="$BENCH_PYTHON"
else
    PY="$HERE/.venv/bin/python"
    if ! "$PY" -c "import torch, transformers, nnsight, safetensors
assert transformers.__version__ == '$PIN_TRANSFORMERS' and nnsight.__version__ == '$PIN_NNSIGHT'" 2>/dev/null; then
        log "creating $HERE/.venv (torch, transformers==$PIN_TRANSFORMERS, nnsight==$PIN_NNSIGHT)"
        if [[ ! -x "$PY" ]] && ! python3 -m venv "$HERE/.venv"; then
            # Debian/Ubuntu ship venv separately.
            if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
                apt-get install -y python3-venv >&2 || { apt-get update >&2 && apt-get install -y python3-venv >&2; }
                python3 -m venv "$HERE/.venv"
            else
                echo "python3 -m venv failed: install python3-venv or set BENCH_PYTHON" >&2
                exit 1
            fi
        fi
        "$PY" -m pip install --upgrade pip >/dev/null
        # torch from the default package index (reachable everywhere this project runs); a CPU-only
        # wheel index can be given with BENCH_TORCH_INDEX to save download size.
        if [[ -n "${BENCH_TORCH_INDEX:-}" ]]; then
            "$PY" -m pip install torch --index-url "$BENCH_TORCH_INDEX"
        else
            "$PY" -m pip install torch
        fi
        "$PY" -m pip install "transformers==$PIN_TRANSFORMERS" "nnsight==$PIN_NNSIGHT" safetensors
    fi
fi
"$PY" -c "import torch, transformers, nnsight; print('python side: torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)" >&2

# --- Checkpoints (random weights, shared by every contender) ---------------------------------
CKPTS=()
for m in $MODELS $BF16_MODELS; do [[ " ${CKPTS[*]} " == *" $m "* ]] || CKPTS+=("$m"); done
[[ "${BENCH_7B:-0}" == 1 ]] && CKPTS+=(llama7b)
if (( ${#CKPTS[@]} )); then
    log "checkpoints: ${CKPTS[*]}"
    "$PY" "$HERE/make_checkpoints.py" "$WORK/checkpoints" "${CKPTS[@]}" >&2
fi

# --- System kernel for nnscope's Linear (the default build needs none) --------------------------
have_lib() {
    local d
    for d in /usr/lib/*/ /usr/lib/ /usr/local/lib/; do [[ -e "$d/lib$1.so" ]] && return 0; done
    return 1
}
need_pkg() { # feature library package
    if [[ " $FEATURES " == *" $1 "* ]] && ! have_lib "$2"; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "installing $3"
            apt-get install -y "$3" >&2 || { apt-get update >&2 && apt-get install -y "$3" >&2; }
        fi
        if ! have_lib "$2"; then
            log "WARNING: lib$2 missing and not installable: nnscope falls back to candle's matmul kernel"
            FEATURES="${FEATURES//$1/}"
        fi
    fi
}
need_pkg dnnl dnnl libdnnl-dev
need_pkg openblas openblas libopenblas-dev
FEATURES="$(echo $FEATURES)"

# --- nnscope: instrumented (default features) and instrumentation compiled out ----------------
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
FEAT_ARGS=()
[[ -n "$FEATURES" ]] && FEAT_ARGS=(--features "$FEATURES")
log "building nnscope bench (hooks)"
cargo build --release -p nnscope --example bench "${FEAT_ARGS[@]}" >&2
cp "$TARGET/release/examples/bench" "$WORK/bench-hooks"
log "building nnscope bench (no hooks: --no-default-features)"
cargo build --release -p nnscope --example bench --no-default-features "${FEAT_ARGS[@]}" >&2
cp "$TARGET/release/examples/bench" "$WORK/bench-nohooks"
# The float32 kernel this build picked (a system library, or nnscope's own when none was found). When
# it is a system library, every float32 plain forward and the float32 matmul are also timed with
# NNSCOPE_GEMM=nnscope: what the default build gives a machine without oneDNN/OpenBLAS.
BACKEND="$("$WORK/bench-hooks" --mode matmul --sizes 64 --warmup 0 --iters 1 | sed -n 's/.*"backend":"\([^"]*\)".*/\1/p' | tail -n 1)"
log "nnscope float32 matmul backend: ${BACKEND:-unknown}"

# --- Measurements ----------------------------------------------------------------------------
OUT="$WORK/results.jsonl"
: >"$OUT"
# Runs one measurement in its own process (so its peak RSS is its own) and appends its JSON line.
measure() {
    local line
    if line="$("$@" 2>"$WORK/last.err" | tail -n 1)" && [[ "$line" == \{* ]]; then
        echo "$line" >>"$OUT"
        echo "$line" >&2
    else
        log "FAILED: $*"
        tail -n 5 "$WORK/last.err" >&2
        echo "{\"failed\": true, \"cmd\": \"$*\"}" >>"$OUT"
    fi
}
matmul_lines() {
    "$@" 2>"$WORK/last.err" | grep '^{' >>"$OUT" || { log "FAILED: $*"; tail -n 5 "$WORK/last.err" >&2; }
}


run_shape() { # model-dir batch tokens iters
    local m="$1" b="$2" t="$3" it="$4" w="$WARMUP"
    local common=(--model "$m" --batch "$b" --tokens "$t" --warmup "$w" --iters "$it")
    log "$(basename "$m") ${b}x${t}"
    measure "$WORK/bench-hooks" --mode plain "${common[@]}"
    measure "$WORK/bench-nohooks" --mode plain "${common[@]}"
    measure "$WORK/bench-hooks" --mode traced "${common[@]}"
    measure "$PY" "$HERE/bench_py.py" --mode eager "${common[@]}" --threads "$THREADS"
    measure "$PY" "$HERE/bench_py.py" --mode nnsight "${common[@]}" --threads "$THREADS"
    if [[ "$BACKEND" != candle-gemm && "$BACKEND" != nnscope-sgemm ]]; then
        measure env NNSCOPE_GEMM=nnscope "$WORK/bench-hooks" --mode plain "${common[@]}"
    fi
}

# bfloat16: the checkpoint loaded in bfloat16 by every contender (nnscope --dtype bf16,
# transformers/nnsight dtype=torch.bfloat16), plain and traced.
run_shape_bf16() { # model-dir batch tokens iters
    local m="$1" b="$2" t="$3" it="$4" w="$WARMUP"
    local common=(--model "$m" --batch "$b" --tokens "$t" --warmup "$w" --iters "$it")
    log "$(basename "$m") ${b}x${t} bfloat16"
    measure "$WORK/bench-hooks" --mode plain "${common[@]}" --dtype bf16
    measure "$WORK/bench-hooks" --mode traced "${common[@]}" --dtype bf16
    measure "$PY" "$HERE/bench_py.py" --mode eager "${common[@]}" --threads "$THREADS" --dtype bfloat16
    measure "$PY" "$HERE/bench_py.py" --mode nnsight "${common[@]}" --threads "$THREADS" --dtype bfloat16
}

# Generation: greedy, exactly 32 new tokens after a 128-token prompt, KV cache on every side;
# plain (nnscope vs transformers' generate()) and traced (every layer's output at every step: nnscope
# vs nnsight's generate() with tracer.all()). Each also times one new token (time to first token).
run_generate() { # model-dir batch iters
    local m="$1" b="$2" it="$3"
    local common=(--model "$m" --batch "$b" --tokens 128 --new 32 --warmup 1 --iters "$it")
    log "$(basename "$m") generate ${b}x128+32"
    measure "$WORK/bench-hooks" --mode generate "${common[@]}"
    measure "$WORK/bench-hooks" --mode generate-traced "${common[@]}"
    measure "$PY" "$HERE/bench_py.py" --mode generate "${common[@]}" --threads "$THREADS"
    measure "$PY" "$HERE/bench_py.py" --mode nnsight-generate "${common[@]}" --threads "$THREADS"
}

BIG_ITERS=$(( ITERS / 2 > 3 ? ITERS / 2 : 3 ))
GEN_ITERS=$(( ITERS / 3 > 2 ? ITERS / 3 : 2 ))
for round in $(seq 1 "$ROUNDS"); do
  if [[ " $SUITE " == *" forward "* ]]; then
    log "round $round of $ROUNDS"
    log "matrix-multiply peak (torch) and candle/nnscope's Linear kernel"
    matmul_lines "$PY" "$HERE/bench_py.py" --mode matmul --sizes 512,1024,2048 --iters 10 --threads "$THREADS"
    matmul_lines "$WORK/bench-hooks" --mode matmul --sizes 512,1024,2048 --iters 10
    if [[ "$BACKEND" != candle-gemm && "$BACKEND" != nnscope-sgemm ]]; then
        matmul_lines env NNSCOPE_GEMM=nnscope "$WORK/bench-hooks" --mode matmul --sizes 512,1024,2048 --iters 10
    fi
    log "bfloat16 matrix-multiply peak (torch) and nnscope's bfloat16 Linear kernel"
    matmul_lines "$PY" "$HERE/bench_py.py" --mode matmul --sizes 512,1024,2048 --iters 10 --threads "$THREADS" \
        --dtype bfloat16
    matmul_lines "$WORK/bench-hooks" --mode matmul --sizes 512,1024,2048 --iters 10 --dtype bf16
    # (5) per-trace fixed cost: the tiny fixture, many iterations.
    run_shape "$ROOT/tests/fixtures/llama" 1 39 200
    for m in $MODELS; do
        run_shape "$WORK/checkpoints/$m" 1 16 "$ITERS"
        run_shape "$WORK/checkpoints/$m" 1 128 "$ITERS"
        run_shape "$WORK/checkpoints/$m" 8 128 "$BIG_ITERS"
    done
    for m in $BF16_MODELS; do
        run_shape_bf16 "$WORK/checkpoints/$m" 1 16 "$ITERS"
        run_shape_bf16 "$WORK/checkpoints/$m" 1 128 "$ITERS"
        run_shape_bf16 "$WORK/checkpoints/$m" 8 128 "$BIG_ITERS"
    done
  fi
  if [[ " $SUITE " == *" generate "* ]]; then
    for m in $MODELS; do
        run_generate "$WORK/checkpoints/$m" 1 "$GEN_ITERS"
        run_generate "$WORK/checkpoints/$m" 8 2
    done
  fi
done
if [[ "${BENCH_7B:-0}" == 1 ]]; then
    # Each in its own process (13.5 GB of weights each; the machine may have 24 GiB).
    log "7B-shaped LLaMA, bfloat16, forward of 32 tokens: nnscope, transformers, nnsight"
    common7=(--model "$WORK/checkpoints/llama7b" --batch 1 --tokens 32 --warmup "$WARMUP_7B" --iters 1)
    measure "$WORK/bench-hooks" --mode traced "${common7[@]}" --dtype bf16
    measure "$WORK/bench-hooks" --mode plain "${common7[@]}" --dtype bf16
    measure "$PY" "$HERE/bench_py.py" --mode eager "${common7[@]}" --threads "$THREADS" --dtype bfloat16
    measure "$PY" "$HERE/bench_py.py" --mode nnsight "${common7[@]}" --threads "$THREADS" --dtype bfloat16
fi

# --- Report ----------------------------------------------------------------------------------
if [[ " $SUITE " == *" forward "* ]]; then
    "$PY" "$HERE/report.py" "$OUT" "$WORK/checkpoints" >"$HERE/RESULTS.md"
fi
if [[ " $SUITE " == *" generate "* ]]; then
    # Replaces the generation section of RESULTS.md (or appends it).
    "$PY" "$HERE/report_generate.py" "$OUT" "$HERE/RESULTS.md"
fi
log "wrote $HERE/RESULTS.md"
