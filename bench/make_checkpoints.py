"""Random-weight checkpoints for the benchmark (never downloaded).

Every contender (nnscope, transformers, nnsight) loads the same files written here.
Usage: python make_checkpoints.py OUT_DIR [gpt2] [llama] [llama7b]
"""

import os
import shutil
import sys

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


def main():
    out = sys.argv[1]
    which = sys.argv[2:] or ["gpt2", "llama"]
    torch.manual_seed(0)
    for name in which:
        d = os.path.join(out, name)
        if os.path.isfile(os.path.join(d, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(d)):
            print(f"{name}: exists in {d}")
            continue
        cfg = CONFIGS[name]()
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
        dtype = torch.bfloat16 if name == "llama7b" else torch.float32
        # from_config initialises every weight randomly (normal, std = initializer_range).
        m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
        m.eval()
        os.makedirs(d, exist_ok=True)
        m.save_pretrained(d, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(TOKENIZER_FROM, f)
            if os.path.isfile(src):
                shutil.copy(src, d)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name}: {type(m).__name__}, {n / 1e6:.1f}M parameters -> {d}")
        del m


if __name__ == "__main__":
    main()
