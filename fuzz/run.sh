#!/usr/bin/env bash
# Runs every nnscope fuzz target for a fixed time (default 60 s each): `fuzz/run.sh [SECONDS] [TARGET...]`.
#
# cargo-fuzz (libFuzzer) needs nightly compiler flags; this uses the stable toolchain with
# RUSTC_BOOTSTRAP=1 and no sanitizer (`--sanitizer none`): coverage-guided, panics and aborts are
# crashes, but there is no AddressSanitizer (nnscope's own code has no unsafe memory access beyond
# the documented mmap). Crash inputs land in fuzz/artifacts/<target>/; keep each as a regression
# under fuzz/regressions/<target>/ (run by crates/nnscope/tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(config config_edits safetensors index hookpoint prompt)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
cargo fuzz build --sanitizer none -O
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  [ -d "fuzz/seeds/$t" ] && cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  if [ "$t" = safetensors ]; then
    cp -n tests/fixtures/llama/model.safetensors "fuzz/corpus/$t/llama.safetensors"
    cp -n tests/fixtures/gpt2/model.safetensors "fuzz/corpus/$t/gpt2.safetensors"
  fi
  echo "== $t: ${secs}s"
  set +e
  cargo fuzz run --sanitizer none -O "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=20 -print_final_stats=1 \
    2>&1 | tee "fuzz/artifacts/$t/log.txt" | grep -E "^(==|#[0-9]+ +DONE|stat::|SUMMARY|.*panicked|.*Test unit written)" || true
  set -e
  crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  echo "== $t: $crashes crash/oom/timeout inputs in fuzz/artifacts/$t"
done
