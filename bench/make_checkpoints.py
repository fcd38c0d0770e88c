"""Random-weight checkpoints for the benchmark (never downloaded).

Every contender (nnscope, transformers, nnsight) loads the same files written here.
Usage: python make_checkpoints.py [--streamed] OUT_DIR [gpt2] [llama] [llama7b]

`gpt2` and `llama` (float32) go through transformers' `from_config` + `save_pretrained`. `llama7b`
(bfloat16, 13.5 GB) is written shard by shard instead (`write_streamed`): the model is built on the
meta device (names and shapes only, no memory), and each 2 GiB shard is filled with random values
with the initialisation transformers uses (normal(0, initializer_range) for matrices and embeddings,
ones for norm weights, zeros for biases), saved, and freed, so the peak stays at a few GiB instead of
the whole model plus a serialised copy. `--streamed` writes every named checkpoint that way (to check
the writer on a small shape).
"""

import json
import os
import shutil
import sys
import time

import torch
import transformers as T

HERE = os.path.dirname(os.path.abspath(__file__))
# A tokenizer is only needed so that nnsight's LanguageModel can be constructed; the benchmark feeds
# token ids directly.
TOKENIZER_FROM = os.path.join(HERE, "..", "tests", "fixtures", "llama")

CONFIGS = {
    # GPT-2 small: 124M parameters (transformers' defaults are exactly GPT-2 small).
    "gpt2": lambda: T.GPT2Config(),
    # A LLaMA shape of about 250M parameters.
    "llama": lambda: T.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # LLaMA-2-7B shape, stored in bfloat16 (optional, ~13.5 GB on disk).
    "llama7b": lambda: T.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


# Checkpoints written shard by shard (see write_streamed).
STREAMED = {"llama7b"}


def copy_tokenizer(d):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(TOKENIZER_FROM, f)
        if os.path.isfile(src):
            shutil.copy(src, d)


def write_streamed(cfg, d, dtype, shard_bytes=2 << 30):
    """Random weights in sharded safetensors (+ index), one shard in memory at a time.

    Names and shapes come from the model built on the meta device, so they are exactly what
    `save_pretrained` would write (no tied weights in these configurations).
    """
    from safetensors.torch import save_file

    with torch.device("meta"):
        m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    shapes = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    del m
    std = cfg.initializer_range
    elem = torch.tensor([], dtype=dtype).element_size()
    groups, cur, cur_bytes = [], [], 0
    for k, shape in shapes:
        nbytes = elem * int(torch.Size(shape).numel())
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((k, shape))
        cur_bytes += nbytes
    if cur:
        groups.append(cur)
    os.makedirs(d, exist_ok=True)
    weight_map, total, n = {}, 0, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for k, shape in group:
            t = torch.empty(shape, dtype=dtype)
            if len(shape) == 1:
                t.fill_(0.0 if k.endswith("bias") else 1.0)  # norm weights 1, biases 0
            else:
                t.normal_(0.0, std)  # Linear weights, embeddings, LM head
            shard[k] = t
            weight_map[k] = fname
            total += t.numel() * elem
            n += t.numel()
        save_file(shard, os.path.join(d, fname), metadata={"format": "pt"})
        del shard
        print(f"  {fname}: {len(group)} tensors", flush=True)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg.dtype = dtype
    cfg.architectures = [T.AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    cfg.save_pretrained(d)
    return n


def main():
    args = sys.argv[1:]
    streamed_all = "--streamed" in args
    args = [a for a in args if a != "--streamed"]
    out = args[0]
    which = args[1:] or ["gpt2", "llama"]
    torch.manual_seed(0)
    for name in which:
        d = os.path.join(out, name)
        if os.path.isfile(os.path.join(d, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(d)):
            print(f"{name}: exists in {d}")
            continue
        cfg = CONFIGS[name]()
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
        dtype = torch.bfloat16 if name == "llama7b" else torch.float32
        if streamed_all or name in STREAMED:
            t0 = time.time()
            n = write_streamed(cfg, d, dtype)
            copy_tokenizer(d)
            print(f"{name}: {n / 1e6:.1f}M parameters ({dtype}), streamed -> {d} in {time.time() - t0:.0f} s")
            continue
        # from_config initialises every weight randomly (normal, std = initializer_range).
        m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
        m.eval()
        os.makedirs(d, exist_ok=True)
        m.save_pretrained(d, safe_serialization=True)
        copy_tokenizer(d)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name}: {type(m).__name__}, {n / 1e6:.1f}M parameters -> {d}")
        del m


if __name__ == "__main__":
    main()
