# %% [markdown]
# # Attention probabilities with nnscope, from Python
#
# A notebook-style walk-through (run it top to bottom with `python examples/python/attention.py`
# from the repository root, or cell by cell in an editor that understands `# %%`). It uses the tiny
# random-weight LLaMA in `tests/fixtures/llama`; put a folder or a Hugging Face Hub id
# (`"HuggingFaceTB/SmolLM2-135M"`) in `MODEL` to run it on a real model.
#
# Setup, once: `pip install ./crates/nnscope-py` (a Rust toolchain and pip are all it needs).

# %%
import pathlib
import sys

import numpy as np

import nnscope

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "tests" / "fixtures" / "llama")

model = nnscope.Model(MODEL, dtype="float32")
print(model)
print(f"{model.model_type}: {model.num_layers} layers, {model.num_heads} heads, "
      f"hidden {model.hidden_size}, vocabulary {model.vocab_size}")

# %% [markdown]
# ## 1. Save the attention probabilities of every layer
# `attention_probabilities.L` is a standard name: it means the same thing (the softmax output that
# multiplies the values) on every architecture. `*` stands for every layer. Arrays come back as
# numpy float32 (torch users: `torch.from_numpy(a)`, no copy).

# %%
prompt = "The quick brown fox jumps over the lazy dog"
out = model.trace(prompt, save=["attention_probabilities.*", "logits", "next_token_probs"])
for name, value in out.items():
    print(f"{name:28s} {value.shape} {value.dtype}")
tokens = out.input_ids.shape[1]
p0 = out["attention_probabilities.0"]          # [batch, heads, query, key]
print("rows sum to 1:", np.allclose(p0.sum(-1), 1.0, atol=1e-5))
print("causal (nothing above the diagonal):", np.abs(np.triu(p0[0, 0], 1)).max() == 0)

# %% [markdown]
# Where does the last token look? The mean over heads of the last query row, per layer:

# %%
for l in range(model.num_layers):
    row = out[f"attention_probabilities.{l}"][0, :, -1].mean(0)
    top = np.argsort(row)[::-1][:3]
    print(f"layer {l}: keys {top.tolist()} get {[round(float(x), 3) for x in row[top]]}")
print("most likely next token id:", int(out["next_token_probs"][0].argmax()))

# %% [markdown]
# ## 2. Where the probabilities live in the forward
# Every call inside the forward is a hookpoint. `source` prints the code with their names; the
# standard name above is one of them.

# %%
print(model.source("attentions.0.source.attention_interface_0"))
print("registered:", model.check()["hookpoint"])
print("discovered:", nnscope.find_attention_probabilities(model)["hookpoint"])

# %% [markdown]
# ## 3. Overwrite them: an `edit` is a Python function run inside the forward
# It receives the value as a numpy array and returns the new one. Here: uniform causal attention
# in every layer (query q spreads its attention evenly over keys 0..q).

# %%
def uniform(p: np.ndarray) -> np.ndarray:
    q, k = p.shape[-2:]
    u = np.tril(np.ones((q, k), np.float32))
    return np.broadcast_to(u / u.sum(-1, keepdims=True), p.shape)

edited = model.trace(
    prompt,
    save=["logits", "attention_probabilities.1"],
    edit={f"attention_probabilities.{l}": uniform for l in range(model.num_layers)},
)
print("logits changed by", float(np.abs(edited["logits"] - out["logits"]).max()))
print("layer 1 now:", np.round(edited["attention_probabilities.1"][0, 0, 3, :5], 3))

# %% [markdown]
# A `set` writes a fixed array instead (numpy or torch), and nnterp's helpers are there too:
# steering a layer's output, skipping layers.

# %%
probs = out["attention_probabilities.1"].copy()
probs[..., 1:, 0] = 0.0                        # take the attention mass off the first token
probs /= probs.sum(-1, keepdims=True)
moved = model.trace(prompt, save="logits", set={"attention_probabilities.1": probs})
print("moving mass off token 0 changed logits by", float(np.abs(moved["logits"] - out["logits"]).max()))

direction = np.random.default_rng(0).standard_normal(model.hidden_size).astype(np.float32)
steered = model.trace(prompt, save="logits", steer={"layers": [0], "vector": direction, "factor": 4.0})
skipped = model.trace(prompt, save="logits", skip_layers=[1])
print("steering changed logits by", float(np.abs(steered["logits"] - out["logits"]).max()))
print("skipping layer 1 changed logits by", float(np.abs(skipped["logits"] - out["logits"]).max()))

# %% [markdown]
# ## 4. A batch, and generation
# A list of prompts is left-padded into one batch; each row equals its prompt alone. `generate`
# runs with the key/value cache and serves the same requests at every step (`NAME@STEP`).

# %%
batch = model.trace([prompt, "Free software"], save="attention_probabilities.0")
print("mask:", batch.attention_mask.tolist())

gen = model.generate(prompt, max_new_tokens=6, ignore_eos=True, save="attention_probabilities.0")
print("continuation:", repr(gen.text[0]))
print("output_ids:", gen["output_ids"].shape)
for s in range(3):
    print(f"attention_probabilities.0@{s}", gen[f"attention_probabilities.0@{s}"].shape)

# %% [markdown]
# ## 5. Mistakes are clear errors
# A typo names the nearest valid names (`HookpointError` is also a `KeyError`); an exception in an
# edit comes out with its traceback and the model stays usable.

# %%
try:
    model.trace(prompt, save="attention_probabilites.0")
except nnscope.HookpointError as e:
    print("HookpointError:", e)

try:
    model.trace(prompt, edit={"layers_output.0": lambda h: h[:, :1]})
except nnscope.ShapeError as e:
    print("ShapeError:", e)
