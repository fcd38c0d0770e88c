#!/usr/bin/env bash
# CI smoke test of the benchmark: the nnscope side only, on the tiny fixture, a few iterations.
# No Python needed. Fails if the bench binary fails or prints no result line.
#   SMOKE_NOHOOKS=1  also builds and runs the instrumentation-free build (--no-default-features)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT"
export RAYON_NUM_THREADS="${BENCH_THREADS:-2}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/release/examples/bench"
FIX="$ROOT/tests/fixtures/llama"

check() { # runs the bench, requires a JSON line
    local out
    out="$("$@")"
    echo "$out"
    grep -q '"min_ms"' <<<"$out" || { echo "smoke: no result from $*" >&2; exit 1; }
}

cargo build --release -p nnscope --example bench
check "$BIN" --mode matmul --sizes 64,256 --warmup 1 --iters 3
check "$BIN" --mode plain --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 5
check "$BIN" --mode traced --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 5
# What run.sh also times: bfloat16 (matmul and forwards) and the forced candle kernel.
check "$BIN" --mode matmul --sizes 64 --warmup 1 --iters 2 --dtype bf16
check "$BIN" --mode plain --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 2 --dtype bf16
check "$BIN" --mode traced --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 2 --dtype bf16
check env NNSCOPE_GEMM=candle "$BIN" --mode plain --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 2
check env NNSCOPE_GEMM=nnscope "$BIN" --mode plain --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 2
check env NNSCOPE_GEMM=nnscope "$BIN" --mode matmul --sizes 64,200 --rows 13 --warmup 1 --iters 2
check "$BIN" --mode traced --model "$ROOT/tests/fixtures/gpt2" --batch 2 --tokens 8 --warmup 1 --iters 3
check "$BIN" --mode generate --model "$FIX" --batch 2 --tokens 8 --new 4 --warmup 1 --iters 2
check "$BIN" --mode generate-traced --model "$ROOT/tests/fixtures/gpt2" --batch 2 --tokens 8 --new 4 --warmup 1 --iters 2
if [[ "${SMOKE_NOHOOKS:-0}" == 1 ]]; then
    cargo build --release -p nnscope --example bench --no-default-features
    check "$BIN" --mode plain --model "$FIX" --batch 1 --tokens 16 --warmup 1 --iters 5
fi
echo "bench smoke: ok"
