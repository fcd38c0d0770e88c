"""The Python-side row of bench/: one trace through nnscope's Python package against nnsight, on
the same checkpoint, the same token ids and the same saves, as a notebook user would run them.

The saves are bench_py.py's: every layer's attention probabilities (nnscope's
`attention_probabilities.L`, nnsight's `attention_interface_1.source.nn_functional_dropout_0`) and
every layer's output. Timing includes getting the arrays back: numpy arrays from nnscope, the saved
torch tensors from nnsight.

One measurement per process (run each side with the interpreter that has it):
  python python_trace.py --mode nnscope --model DIR --batch B --tokens T   # needs `nnscope`
  python python_trace.py --mode nnsight --model DIR --batch B --tokens T   # needs torch, nnsight
Prints one JSON line. Threads: --threads (default 2): torch.set_num_threads for nnsight; nnscope's
candle thread pool reads RAYON_NUM_THREADS, which must be set before the process starts (this
script re-executes itself with it set).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


def ids_list(batch, tokens, vocab):
    """Same ids as crates/nnscope/examples/bench.rs and bench_py.py: (1 + 7919 i) mod min(vocab, 32000)."""
    v = min(vocab, 32000)
    flat = [(1 + 7919 * i) % v for i in range(batch * tokens)]
    return [flat[r * tokens:(r + 1) * tokens] for r in range(batch)]


def timeit(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return min(samples), statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["nnscope", "nnsight"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.mode == "nnscope" and os.environ.get("RAYON_NUM_THREADS") != str(a.threads):
        os.environ["RAYON_NUM_THREADS"] = str(a.threads)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    common = {"mode": a.mode, "model": a.model, "batch": a.batch, "tokens": a.tokens,
              "iters": a.iters, "threads": a.threads, "python": platform.python_version()}

    if a.mode == "nnscope":
        import numpy as np

        import nnscope

        model = nnscope.Model(a.model, dtype="float32")
        x = np.array(ids_list(a.batch, a.tokens, model.vocab_size), dtype=np.int64)
        saves = [f"{n}.{l}" for l in range(model.num_layers)
                 for n in ("attention_probabilities", "layers_output")]
        common["nnscope"] = nnscope.__version__

        def fn():
            out = model.trace(input_ids=x, save=saves)
            if len(out) != len(saves):
                raise RuntimeError("missing saves")
            return out
    else:
        import torch
        import transformers
        import nnsight
        from nnsight import LanguageModel

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_py import attn_probs_envoy, layer_envoy

        torch.set_num_threads(a.threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            a.model, attn_implementation="eager", dtype=torch.float32)
        hf.eval()
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        model = LanguageModel(hf, tokenizer=tok)
        arch, layers = hf.config.model_type, hf.config.num_hidden_layers
        x = torch.tensor(ids_list(a.batch, a.tokens, hf.config.vocab_size), dtype=torch.int64)
        common.update({"nnsight": nnsight.__version__, "torch": torch.__version__})

        def fn():
            saved = []
            with torch.inference_mode():
                with model.trace(x, use_cache=False):
                    for layer in range(layers):
                        saved.append(attn_probs_envoy(model, arch, layer).output.save())
                        saved.append(layer_envoy(model, arch, layer).output.save())
            if len(saved) != 2 * layers:
                raise RuntimeError("missing saves")
            return saved

    mn, med = timeit(fn, a.warmup, a.iters)
    print(json.dumps({**common, "min_ms": mn, "median_ms": med}), flush=True)


if __name__ == "__main__":
    main()
