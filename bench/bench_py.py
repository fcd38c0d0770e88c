"""The Python side of bench/: transformers eager forwards, nnsight traces, and torch's matmul peak.

One measurement per process, so that the peak resident memory printed belongs to it alone:
  python bench_py.py --mode eager|nnsight --model DIR --batch B --tokens T [--warmup N] [--iters N]
  python bench_py.py --mode matmul --sizes 512,1024,2048
  python bench_py.py --mode generate|nnsight-generate --model DIR --batch B --tokens T --new N
    (greedy generate() with the KV cache, exactly N new tokens; nnsight-generate saves every
    layer's output at every step through tracer.all(); both also time N = 1: time to first token)
--dtype float32|bfloat16 (default float32): the checkpoint is loaded with `dtype=` that type (eager
and nnsight alike), or the matmul operands are made of it; every JSON line carries it.
Prints one JSON line per measurement. Threads: --threads (default 2) -> torch.set_num_threads.
"""

import argparse
import json
import os
import sys
import resource
import statistics
import time

import torch


def ids(batch, tokens, vocab):
    """Same ids as crates/nnscope/examples/bench.rs: (1 + 7919 i) mod min(vocab, 32000)."""
    v = min(vocab, 32000)
    i = torch.arange(batch * tokens, dtype=torch.int64)
    return ((1 + 7919 * i) % v).reshape(batch, tokens)


def timeit(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    if os.environ.get("BENCH_VERBOSE"):
        print("samples (ms):", " ".join(f"{s:.2f}" for s in samples), file=sys.stderr)
    return min(samples), statistics.median(samples)


def peak_rss_mib():
    """Peak resident set size (Linux VmHWM), MiB; falls back to getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss():
    """Resets the peak-RSS mark (clear_refs 5) so the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def attn_probs_envoy(model, arch, layer):
    """The hookpoint nnscope calls attention_probabilities.L, spelled as nnsight's .source path."""
    # nnsight 0.8 numbers the assignment `attention_interface = ...get_interface(..)` as
    # attention_interface_0; the call is attention_interface_1. Both architectures' eager attention
    # ends in `nn.functional.dropout(softmax(..))`.
    attn = model.transformer.h[layer].attn if arch == "gpt2" else model.model.layers[layer].self_attn
    return attn.source.attention_interface_1.source.nn_functional_dropout_0


def layer_envoy(model, arch, layer):
    return model.transformer.h[layer] if arch == "gpt2" else model.model.layers[layer]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["eager", "nnsight", "matmul", "generate", "nnsight-generate"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    common = {"threads": a.threads, "torch": torch.__version__}

    if a.dtype not in ("float32", "bfloat16"):
        sys.exit(f"--dtype: float32 or bfloat16, not {a.dtype}")
    dtype = getattr(torch, a.dtype)
    if a.mode == "matmul":
        for n in [int(s) for s in a.sizes.split(",")]:
            x = torch.randn(n, n).to(dtype)
            w = torch.randn(n, n).to(dtype)
            # x @ w.T: the product torch.nn.Linear computes.
            mn, med = timeit(lambda: torch.nn.functional.linear(x, w), a.warmup, a.iters)
            gflops = 2 * n**3 / 1e9 / (mn / 1e3)
            print(json.dumps({"contender": "torch", "mode": "matmul", "n": n, "min_ms": mn, "median_ms": med,
                              "gflops": gflops, "dtype": a.dtype, **common}), flush=True)
        return

    import transformers

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="eager", dtype=dtype)
    hf.eval()
    load_ms = (time.perf_counter() - t0) * 1e3
    arch = hf.config.model_type
    layers = hf.config.num_hidden_layers
    x = ids(a.batch, a.tokens, hf.config.vocab_size)
    common.update({"transformers": transformers.__version__})

    first = None
    if a.mode == "eager":
        def fn():
            with torch.inference_mode():
                return hf(input_ids=x, use_cache=False).logits
    elif a.mode == "generate":
        mask = torch.ones_like(x)

        def gen(n):
            with torch.inference_mode():
                out = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=0)
            assert out.shape[1] == x.shape[1] + n
            return out

        first = timeit(lambda: gen(1), a.warmup, a.iters)
        fn = lambda: gen(a.new)
    elif a.mode == "nnsight-generate":
        import nnsight
        from nnsight import LanguageModel

        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        model = LanguageModel(hf, tokenizer=tok)
        common.update({"nnsight": nnsight.__version__})
        mask = torch.ones_like(x)

        def gen(n):
            with torch.inference_mode():
                with model.generate({"input_ids": x, "attention_mask": mask}, max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0) as tracer:
                    saved = list().save()
                    with tracer.all():
                        for layer in range(layers):
                            saved.append(layer_envoy(model, arch, layer).output)
            if len(saved) != layers * n:
                raise RuntimeError(f"expected {layers * n} saves, got {len(saved)}")
            return saved

        first = timeit(lambda: gen(1), a.warmup, a.iters)
        fn = lambda: gen(a.new)
    else:
        import nnsight
        from nnsight import LanguageModel

        # Wrap the already-loaded module: the very same weights and configuration as `eager`.
        # The tokenizer only satisfies LanguageModel's constructor: inputs are token ids.
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        model = LanguageModel(hf, tokenizer=tok)
        common.update({"nnsight": nnsight.__version__})

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

    load_peak = peak_rss_mib()
    reset = reset_peak_rss()
    mn, med = timeit(fn, a.warmup, a.iters)
    fwd_peak = peak_rss_mib()
    contender = "transformers" if a.mode in ("eager", "generate") else "nnsight"
    if first is not None:
        common.update({"new": a.new, "first_min_ms": first[0], "first_median_ms": first[1]})
    print(json.dumps({"contender": contender, "mode": a.mode, "model": a.model, "batch": a.batch,
                      "tokens": a.tokens, "iters": a.iters, "min_ms": mn, "median_ms": med,
                      "peak_rss_mib": max(load_peak, fwd_peak),
                      "forward_peak_rss_mib": fwd_peak if reset else None, "load_ms": load_ms, "dtype": a.dtype, **common}),
          flush=True)


if __name__ == "__main__":
    main()
