"""The nnsight side of bench/collect.sh: the job of `nnscope collect ... --positions mean`, in Python.

  python collect_py.py --model DIR --dataset corpus.txt --out DIR [--batch 8] [--shard-docs 32]
      [--max-tokens 128] [--threads 2]

Every layer's output (`transformer.h[L].output`), averaged over each document's real tokens, saved
with batched nnsight traces: left padding, attention mask, positions from the mask (as nnscope, so
each row equals its document alone), written as float32 shards of --shard-docs documents with
safetensors. Prints one JSON line: documents, tokens, seconds (loading excluded), tokens per second.
"""

import argparse
import json
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-docs", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import nnsight
    import transformers
    from nnsight import LanguageModel
    from safetensors.torch import save_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="eager", dtype=torch.float32)
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = LanguageModel(hf, tokenizer=tok)
    layers = hf.config.num_hidden_layers
    pad = hf.config.pad_token_id or 0
    os.makedirs(a.out, exist_ok=True)

    t0 = time.perf_counter()
    with open(a.dataset, encoding="utf-8") as f:
        docs = [line.rstrip("\n") for line in f]
    tokens = 0
    shard, part, n_docs = {f"layers_output.{L}": [] for L in range(layers)}, 0, 0

    def flush():
        nonlocal shard, part
        if not shard["layers_output.0"]:
            return
        save_file({k: torch.cat(v).contiguous() for k, v in shard.items()},
                  os.path.join(a.out, f"part-{part:05d}.safetensors"))
        part += 1
        shard = {k: [] for k in shard}

    i = 0
    while i < len(docs):
        room = a.shard_docs - sum(x.shape[0] for x in shard["layers_output.0"])
        batch = [tok(d)["input_ids"][: a.max_tokens] for d in docs[i : i + min(a.batch, room)]]
        i += len(batch)
        batch = [b for b in batch if b]
        if not batch:
            continue
        t = max(len(b) for b in batch)
        ids = torch.tensor([[pad] * (t - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (t - len(b)) + [1] * len(b) for b in batch])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        saved = []
        with torch.inference_mode():
            with model.trace(ids, attention_mask=mask, position_ids=pos, use_cache=False):
                for L in range(layers):
                    saved.append(model.transformer.h[L].output.save())
        m = mask.unsqueeze(-1).float()
        for L, s in enumerate(saved):
            h = s[0] if isinstance(s, tuple) else s
            shard[f"layers_output.{L}"].append(((h * m).sum(1) / m.sum(1)).float())
        tokens += int(mask.sum())
        n_docs += len(batch)
        if sum(x.shape[0] for x in shard["layers_output.0"]) >= a.shard_docs:
            flush()
    flush()
    secs = time.perf_counter() - t0
    print(json.dumps({"contender": "nnsight", "nnsight": nnsight.__version__, "documents": n_docs,
                      "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}))


if __name__ == "__main__":
    main()
