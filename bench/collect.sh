#!/usr/bin/env bash
# Collection throughput: `nnscope collect` against the same job in Python with nnsight.
#
# The job: every layer's output of the GPT-2-small checkpoint (bench/work/checkpoints/gpt2, written
# by make_checkpoints.py as in run.sh), averaged over each document's tokens (--positions mean),
# over a deterministic corpus of BENCH_DOCS documents of 16-128 tokens, batch 8, shards of 32
# documents, float32, BENCH_THREADS threads on both sides. Loading is excluded on both sides;
# tokenizing, the traced forwards and writing the shards are included. Each side runs
# BENCH_ROUNDS times (fresh process, fresh output folder); min and median are reported, and the
# two outputs are compared value by value (the same job, not just the same speed).
#
# Writes bench/work/collect.jsonl and prints a Markdown section for bench/RESULTS.md.
#   BENCH_PYTHON   python with torch, transformers, nnsight, safetensors (default: bench/.venv or python3)
#   BENCH_THREADS  default 2        BENCH_ROUNDS  default 3        BENCH_DOCS  default 128
#   BENCH_FEATURES default dnnl (nnscope's matmul kernel, as run.sh)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WORK="$HERE/work"
THREADS="${BENCH_THREADS:-2}"
ROUNDS="${BENCH_ROUNDS:-3}"
DOCS="${BENCH_DOCS:-128}"
FEATURES="${BENCH_FEATURES-dnnl}"
PY="${BENCH_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
mkdir -p "$WORK"
CKPT="$WORK/checkpoints/gpt2"
[[ -f "$CKPT/config.json" ]] || "$PY" "$HERE/make_checkpoints.py" "$WORK/checkpoints" gpt2 >&2

FEAT_ARGS=()
[[ -n "$FEATURES" ]] && FEAT_ARGS=(--features "nnscope/$FEATURES")
(cd "$ROOT" && cargo build --release -p nnscope-cli "${FEAT_ARGS[@]}" >&2)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/nnscope"

CORPUS="$WORK/collect-corpus.txt"
"$PY" - "$CORPUS" "$DOCS" <<'PYEOF'
import sys
words = "the quick brown fox jumps over a lazy dog while free software runs everywhere today".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        n = 16 + (i * 37) % 112
        f.write(" ".join(words[(i * 7 + k * 11) % len(words)] for k in range(n)) + "\n")
PYEOF

OUT="$WORK/collect.jsonl"
: > "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/collect-nnscope" "$WORK/collect-nnsight"
  line=$("$BIN" collect "$CKPT" --dataset "$CORPUS" --save 'layers_output.*' --positions mean \
      --batch-size 8 --shard-docs 32 --max-tokens 128 --out "$WORK/collect-nnscope")
  echo "$line" >&2
  "$PY" - "$line" >> "$OUT" <<'PYEOF'
import json, re, sys
m = re.search(r"this run: (\d+) documents, (\d+) tokens in ([0-9.]+) s", sys.argv[1])
d, t, s = int(m[1]), int(m[2]), float(m[3])
print(json.dumps({"contender": "nnscope", "documents": d, "tokens": t, "seconds": s, "tokens_per_s": t / s}))
PYEOF
  "$PY" "$HERE/collect_py.py" --model "$CKPT" --dataset "$CORPUS" --out "$WORK/collect-nnsight" \
      --batch 8 --shard-docs 32 --max-tokens 128 --threads "$THREADS" | tee -a "$OUT" >&2
done

"$PY" - "$OUT" "$WORK" "$THREADS" "$ROUNDS" "$DOCS" <<'PYEOF'
import glob, json, os, platform, statistics, subprocess, sys, time
from safetensors.numpy import load_file
out, work, threads, rounds, docs = sys.argv[1:]
rows = [json.loads(l) for l in open(out)]
def stats(c):
    v = [r["tokens_per_s"] for r in rows if r["contender"] == c]
    s = [r["seconds"] for r in rows if r["contender"] == c]
    return max(v), statistics.median(v), rows[[r["contender"] for r in rows].index(c)], min(s), statistics.median(s)
ns_best, ns_med, ns, ns_smin, ns_smed = stats("nnscope")
py_best, py_med, py, py_smin, py_smed = stats("nnsight")
# Same job: the two outputs agree value by value.
def cat(d):
    parts = sorted(glob.glob(os.path.join(d, "part-*.safetensors")))
    ts = [load_file(p) for p in parts]
    import numpy as np
    return {k: np.concatenate([t[k] for t in ts]) for k in ts[0] if k.startswith("layers_output")}
a, b = cat(os.path.join(work, "collect-nnscope")), cat(os.path.join(work, "collect-nnsight"))
import numpy as np
diff = max(float(np.abs(a[k] - b[k]).max() / max(1.0, np.abs(b[k]).max())) for k in b)
cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name")), platform.processor())
load = os.getloadavg()
print(f"""## Collection throughput (`nnscope collect`, bench/collect.sh)

Every layer's output of GPT-2 small (random weights, float32), mean over each document's tokens,
{ns['documents']} documents / {ns['tokens']} tokens (16-128 tokens each), batch 8, shards of 32 documents, {threads} threads,
{rounds} rounds each (fresh process), measured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; loading excluded, tokenizing + traced forwards + writing shards included.
nnsight {py.get('nnsight', '?')}: batched `model.trace(ids, attention_mask=..., position_ids=...)` saving
`transformer.h[L].output`, mean in torch, `safetensors.torch.save_file` per shard. Both outputs agree
to {diff:.1e} (max difference relative to max |value|).

| | seconds min | seconds median | tokens/s best | tokens/s median |
| --- | --- | --- | --- | --- |
| nnscope collect | {ns_smin:.2f} | {ns_smed:.2f} | {ns_best:.0f} | {ns_med:.0f} |
| nnsight (Python) | {py_smin:.2f} | {py_smed:.2f} | {py_best:.0f} | {py_med:.0f} |
| ratio nnscope / nnsight (throughput) | | | {ns_best / py_best:.2f}x | {ns_med / py_med:.2f}x |

CPU: {cpu}, {os.cpu_count()} cores. Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(a shared machine: the absolute numbers are low and noisy; both sides ran interleaved, round by round).""")
PYEOF
