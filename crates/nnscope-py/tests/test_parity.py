"""Parity with the Hugging Face goldens through the Python API: logits, hidden states, attention
probabilities, the uniform-attention edit (as a Python `edit` and as a `set`), and generation."""

from __future__ import annotations

import numpy as np

from conftest import FIXTURES, Golden, assert_close, assert_probs_close

import nnscope


def uniform_causal(shape) -> np.ndarray:
    """Query row q gets 1/(q+1) on keys 0..q (the golden's uniform attention)."""
    b, h, q, k = shape
    u = np.tril(np.ones((q, k), dtype=np.float32))
    u /= u.sum(axis=-1, keepdims=True)
    return np.broadcast_to(u, (b, h, q, k)).copy()


def test_single_prompt_matches_the_goldens(llama, golden):
    out = llama.trace(
        golden.prompt,
        save=["logits", "attention_probabilities.*", "layers_output.*", "layers_input.*"],
    )
    np.testing.assert_array_equal(out.input_ids, golden.t["single.input_ids"])
    assert out["logits"].dtype == np.float32
    assert_close(out["logits"], golden.t["single.logits"], "logits")
    for l in range(llama.num_layers):
        assert_probs_close(
            out[f"attention_probabilities.{l}"],
            golden.t[f"single.attention_probabilities.{l}"],
            f"attention_probabilities.{l}",
        )
        assert_close(out[f"layers_output.{l}"], golden.t[f"single.layers_output.{l}"], f"layer {l}")
        assert_close(out[f"layers_input.{l}"], golden.t[f"single.layers_input.{l}"], f"layer {l} in")


def test_left_padded_batch_matches_the_goldens_on_real_positions(llama, golden):
    # batchpos: positions cumsum(mask) - 1, what nnscope (and generate(), nnsight) use.
    out = llama.trace(golden.batch, save=["logits", "attention_probabilities.*"])
    np.testing.assert_array_equal(out.input_ids, golden.t["batchpos.input_ids"])
    np.testing.assert_array_equal(out.attention_mask, golden.t["batchpos.attention_mask"])
    mask = golden.t["batchpos.attention_mask"].astype(bool)
    for b in range(mask.shape[0]):
        real = mask[b]
        assert_close(out["logits"][b, real], golden.t["batchpos.logits"][b, real], f"row {b}")
        for l in range(llama.num_layers):
            got = out[f"attention_probabilities.{l}"][b][:, real][:, :, real]
            want = golden.t[f"batchpos.attention_probabilities.{l}"][b][:, real][:, :, real]
            assert_probs_close(got, want, f"row {b} layer {l}")


def test_uniform_attention_with_a_python_edit(llama, golden):
    seen = []

    def uniform(p: np.ndarray) -> np.ndarray:
        seen.append(p.shape)
        assert p.dtype == np.float32
        return uniform_causal(p.shape)

    edits = {f"attention_probabilities.{l}": uniform for l in range(llama.num_layers)}
    out = llama.trace(input_ids=golden.t["single.input_ids"], save="logits", edit=edits)
    assert len(seen) == llama.num_layers
    assert_close(out["logits"], golden.t["uniform_attention.logits"], "uniform attention logits")
    # And it really changed something.
    assert np.abs(out["logits"] - golden.t["single.logits"]).max() > 1e-3


def test_uniform_attention_with_set(llama, golden):
    ids = golden.t["single.input_ids"]
    shape = golden.t["single.attention_probabilities.0"].shape
    sets = {f"attention_probabilities.{l}": uniform_causal(shape) for l in range(llama.num_layers)}
    out = llama.trace(input_ids=ids, save="logits", set=sets)
    assert_close(out["logits"], golden.t["uniform_attention.logits"], "uniform attention logits")


def test_generation_matches_the_goldens(llama, golden):
    n = int(golden.meta.get("new_tokens", 8))
    g = llama.generate(
        input_ids=golden.t["single.input_ids"], max_new_tokens=n, ignore_eos=True, save="logits"
    )
    assert g["output_ids"].dtype == np.int64
    np.testing.assert_array_equal(g["output_ids"], golden.t["gen.single.sequences"])
    for s in range(n):
        assert_close(g[f"logits@{s}"][:, -1], golden.t["gen.single.logits"][s], f"step {s}")
    assert_close(g.scores, golden.t["gen.single.logits"], "scores")
    assert len(g.text) == 1 and isinstance(g.text[0], str)


def test_batched_generation_matches_the_goldens(llama, golden):
    n = int(golden.meta.get("new_tokens", 8))
    g = llama.generate(golden.batch, max_new_tokens=n, ignore_eos=True, save=["logits"])
    np.testing.assert_array_equal(g["output_ids"], golden.t["gen.batch.sequences"])
    for s in range(n):
        assert_close(g[f"logits@{s}"][:, -1], golden.t["gen.batch.logits"][s], f"step {s}")
    assert len(g.text) == 2


def test_generation_steps_limit_the_saves(llama, golden):
    g = llama.generate(
        golden.prompt, max_new_tokens=4, ignore_eos=True, save="layers_output.0", steps=(1, 3)
    )
    assert sorted(k for k in g if k != "output_ids") == ["layers_output.0@1", "layers_output.0@2"]
    assert g["layers_output.0@1"].shape == (1, 1, llama.hidden_size)


def test_other_architectures_through_python():
    # The bindings are architecture-blind; one more family (learned positions, fused QKV) as a check.
    g = Golden("gpt2")
    m = nnscope.Model(str(FIXTURES / "gpt2"))
    out = m.trace(input_ids=g.t["single.input_ids"], save=["logits", "attention_probabilities.0"])
    assert_close(out["logits"], g.t["single.logits"], "gpt2 logits")
    assert_probs_close(
        out["attention_probabilities.0"], g.t["single.attention_probabilities.0"], "gpt2 probs"
    )
