"""nnterp's own test-suite checks, reproduced in Python against nnscope: standard names against raw
module paths, next_token_probs summing to 1, steering and skipping layers changing the logits,
moving attention mass off the first token changing the logits, a batch equal to its prompts alone,
and the attention probabilities of a padded two-prompt batch summing to 1."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURES, Golden, assert_close

import nnscope

# Hugging Face module paths of each fixture, written out (not derived from nnscope's renaming).
RAW = {
    "llama": {
        "layers_output.{l}": "model.layers.{l}.output",
        "layers_input.{l}": "model.layers.{l}.input",
        "attentions_output.{l}": "model.layers.{l}.self_attn.output",
        "mlps_output.{l}": "model.layers.{l}.mlp.output",
        "token_embeddings": "model.embed_tokens.output",
        "ln_final.output": "model.norm.output",
        "logits": "lm_head.output",
    },
    "gpt2": {
        "layers_output.{l}": "transformer.h.{l}.output",
        "layers_input.{l}": "transformer.h.{l}.input",
        "attentions_output.{l}": "transformer.h.{l}.attn.output",
        "mlps_output.{l}": "transformer.h.{l}.mlp.output",
        "token_embeddings": "transformer.wte.output",
        "ln_final.output": "transformer.ln_f.output",
        "logits": "lm_head.output",
    },
}


@pytest.mark.parametrize("arch", sorted(RAW))
def test_standard_names_equal_raw_module_paths(arch):
    m = nnscope.Model(str(FIXTURES / arch))
    pairs = []
    for std, raw in RAW[arch].items():
        for l in range(m.num_layers) if "{l}" in std else [None]:
            pairs.append((std.format(l=l), raw.format(l=l)))
    names = [n for p in pairs for n in p]
    out = m.trace("The quick brown fox jumps", save=names)
    for std, raw in pairs:
        assert out[std].shape[-1] in (m.hidden_size, m.vocab_size), std
        np.testing.assert_array_equal(out[std], out[raw], err_msg=f"{std} vs {raw}")
    # The residual stream is one chain: a layer's input is the previous layer's output.
    for l in range(1, m.num_layers):
        np.testing.assert_array_equal(out[f"layers_input.{l}"], out[f"layers_output.{l - 1}"])


def test_next_token_probs_sum_to_one(llama, golden):
    for prompt in [golden.prompt, golden.batch]:
        p = llama.trace(prompt, save="next_token_probs")["next_token_probs"]
        assert p.shape == (1 if isinstance(prompt, str) else 2, llama.vocab_size)
        assert (p >= 0).all()
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-5)


def test_steering_changes_the_logits(llama, golden):
    base = llama.trace(golden.prompt, save=["logits", "layers_output.0"])
    v = np.random.default_rng(0).standard_normal(llama.hidden_size).astype(np.float32)
    steered = llama.trace(
        golden.prompt,
        save=["logits", "layers_output.0"],
        steer={"layers": [0], "vector": v, "factor": 2.0, "positions": [3]},
    )
    assert np.abs(steered["logits"] - base["logits"]).max() > 1e-3
    # Exactly factor * vector added at position 3 of layer 0, nothing elsewhere.
    diff = steered["layers_output.0"] - base["layers_output.0"]
    np.testing.assert_allclose(diff[0, 3], 2.0 * v, atol=1e-5)
    assert np.abs(np.delete(diff[0], 3, axis=0)).max() == 0


def test_skipping_layers_changes_the_logits(llama, golden):
    base = llama.trace(golden.prompt, save="logits")
    out = llama.trace(golden.prompt, save=["logits", "layers_input.0", "layers_output.0"], skip_layers=[0])
    np.testing.assert_array_equal(out["layers_output.0"], out["layers_input.0"])
    assert np.abs(out["logits"] - base["logits"]).max() > 1e-3


def test_moving_attention_off_the_first_token_changes_the_logits(llama, golden):
    base = llama.trace(golden.prompt, save="logits")

    def off_first(p: np.ndarray) -> np.ndarray:
        p = p.copy()
        p[..., 1:, 0] = 0.0  # the first query has only the first key; keep it
        return p / p.sum(axis=-1, keepdims=True)

    edits = {f"attention_probabilities.{l}": off_first for l in range(llama.num_layers)}
    out = llama.trace(golden.prompt, save=["logits", "attention_probabilities.0"], edit=edits)
    assert np.abs(out["logits"] - base["logits"]).max() > 1e-3
    # The save sees the edited value (edits come before saves).
    assert out["attention_probabilities.0"][..., 1:, 0].max() == 0


def test_a_batch_equals_its_prompts_alone(llama, golden):
    batch = llama.trace(golden.batch, save=["logits", "layers_output.1"])
    mask = batch.attention_mask.astype(bool)
    for b, prompt in enumerate(golden.batch):
        alone = llama.trace(prompt, save=["logits", "layers_output.1"])
        assert_close(batch["logits"][b, mask[b]], alone["logits"][0], f"row {b} logits")
        assert_close(batch["layers_output.1"][b, mask[b]], alone["layers_output.1"][0], f"row {b}")


def test_padded_batch_attention_probabilities_sum_to_one(llama, golden):
    out = llama.trace(golden.batch, save="attention_probabilities.*")
    mask = out.attention_mask.astype(bool)
    assert not mask.all(), "the batch should be padded"
    for l in range(llama.num_layers):
        p = out[f"attention_probabilities.{l}"]
        for b in range(p.shape[0]):
            rows = p[b][:, mask[b]]  # real query rows
            np.testing.assert_allclose(rows.sum(axis=-1), 1.0, atol=1e-5)
            # No mass on padding keys.
            assert np.abs(rows[:, :, ~mask[b]]).max() == 0 if (~mask[b]).any() else True
