"""Sparse autoencoders (``sae=``, ``splice=``, ``clamp=``) and the experiments (logit lens,
patching, gradients, direct logit attribution, patchscopes, prompts) through the Python API,
against the goldens from transformers + torch: the SAE goldens
(``tests/fixtures/<arch>/saes/<name>/golden.safetensors``), ``lens.logits`` and ``patch.*`` of
golden.safetensors, and ``grad.*`` / per-head ``patch.*`` of experiments.safetensors."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from conftest import FIXTURES, Golden, assert_close

import nnscope


def load(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


SAES = [
    ("llama", "res_post_0"),  # standard, blocks.0.hook_resid_post
    ("llama", "topk_post_1"),  # topk, blocks.1.hook_resid_post
    ("gpt2", "res_pre_1"),  # jumprelu, blocks.1.hook_resid_pre
]


@pytest.fixture(scope="module")
def models():
    return {a: nnscope.Model(str(FIXTURES / a)) for a in {"llama", "gpt2"}}


def hook_of(arch: str, name: str) -> str:
    import json

    cfg = json.loads((FIXTURES / arch / "saes" / name / "cfg.json").read_text())
    return cfg.get("hook_name") or cfg["metadata"]["hook_name"]


@pytest.mark.parametrize("arch,name", SAES)
def test_sae_attach_splice_clamp_match_the_goldens(models, arch, name):
    model = models[arch]
    ids = Golden(arch).t["single.input_ids"]
    sae = FIXTURES / arch / "saes" / name
    g = load(sae / "golden.safetensors")
    h = hook_of(arch, name)
    fa = f"{h}.sae.feature_acts"
    out = model.trace(
        input_ids=ids, sae=sae, save=[fa, f"{h}.sae.reconstruction", "logits"]
    )
    assert_close(out[fa], g["feature_acts"], f"{name} feature_acts")
    assert_close(out[f"{h}.sae.reconstruction"], g["reconstruction"], f"{name} reconstruction")
    assert_close(out["logits"], g["logits"], f"{name} logits (attached: unchanged)")
    out = model.trace(input_ids=ids, sae=str(sae), splice=True, save="logits")
    assert_close(out["logits"], g["spliced_logits"], f"{name} spliced_logits")
    index, value = int(g["clamp"][0]), float(g["clamp"][1])
    for clamp in (f"{fa}:{index}={value}", (fa, index, value), [(fa, index, value)]):
        out = model.trace(input_ids=ids, sae=[str(sae)], clamp=clamp, save="logits")
        assert_close(out["logits"], g["clamped_logits"], f"{name} clamped_logits ({clamp!r})")


def test_sae_at_another_hook_and_several_saes(models):
    model = models["llama"]
    ids = Golden("llama").t["single.input_ids"]
    a, b = FIXTURES / "llama/saes/res_post_0", FIXTURES / "llama/saes/topk_post_1"
    ga, gb = load(a / "golden.safetensors"), load(b / "golden.safetensors")
    out = model.trace(
        input_ids=ids,
        sae=f"{a}=layers_output.0",
        save="layers_output.0.sae.reconstruction",
    )
    assert_close(out["layers_output.0.sae.reconstruction"], ga["reconstruction"], "SPEC=HOOK")
    fa, fb = (f"{hook_of('llama', n)}.sae.feature_acts" for n in ("res_post_0", "topk_post_1"))
    out = model.trace(input_ids=ids, sae=[a, b], save=[fa, fb, "logits"])
    assert_close(out[fa], ga["feature_acts"], "first of two SAEs")
    assert_close(out[fb], gb["feature_acts"], "second of two SAEs")
    assert_close(out["logits"], ga["logits"], "two SAEs attached: logits unchanged")


def test_generate_with_an_sae(models):
    model = models["llama"]
    ids = Golden("llama").t["single.input_ids"]
    sae = FIXTURES / "llama/saes/res_post_0"
    g = load(sae / "golden.safetensors")
    fa = "blocks.0.hook_resid_post.sae.feature_acts"
    # Step 0 is the forward over the prompt: its scores are the last position's logits.
    out = model.generate(input_ids=ids, max_new_tokens=2, sae=sae, splice=True, save=fa)
    assert_close(out.scores[0], g["spliced_logits"][:, -1], "spliced step-0 scores")
    assert_close(out[f"{fa}@0"], g["feature_acts"], "feature_acts at step 0")
    index, value = int(g["clamp"][0]), float(g["clamp"][1])
    out = model.generate(input_ids=ids, max_new_tokens=1, sae=sae, clamp=(fa, index, value))
    assert_close(out.scores[0], g["clamped_logits"][:, -1], "clamped step-0 scores")


def test_sae_errors_are_clear(models):
    model = models["llama"]
    with pytest.raises(nnscope.InputError, match="splice"):
        model.trace("The quick", splice=True, save="logits")
    with pytest.raises(nnscope.InputError, match="NAME:INDEX=VALUE"):
        model.trace("The quick", clamp="layers_output.0=3", save="logits")
    with pytest.raises(nnscope.LoadError):
        model.trace("The quick", sae="/no/such/sae", save="logits")
    with pytest.raises(nnscope.HookpointError, match="no SAE is attached"):
        model.trace("The quick", save="layers_output.0.sae.feature_acts")


def test_logit_lens_matches_the_golden(llama, golden):
    out = llama.logit_lens(input_ids=golden.t["single.input_ids"])
    assert isinstance(out, nnscope.LensOutput)
    assert_close(out["logits"], golden.t["lens.logits"], "lens.logits")
    last = golden.t["lens.logits"][:, :, -1].astype(np.float64)  # [L, B, V]
    e = np.exp(last - last.max(-1, keepdims=True))
    assert_close(out["probs"], (e / e.sum(-1, keepdims=True)).transpose(1, 0, 2), "lens probs")
    inv = llama.logit_lens("The quick brown fox", inverse=True)
    assert inv["inverse"].shape == inv["logits"].shape


def test_patching_matches_the_golden(llama, golden):
    exp = load(FIXTURES / "llama/experiments.safetensors")
    p = llama.patch(
        "The quick brown fox jumps over the lazy",
        "The quick brown box jumps over the lazy",
        " dog",
        " cat",
        heads=True,
    )
    np.testing.assert_array_equal(p["clean_ids"], golden.t["patch.clean_ids"].reshape(p["clean_ids"].shape))
    np.testing.assert_array_equal(p["corrupt_ids"], golden.t["patch.corrupt_ids"].reshape(p["corrupt_ids"].shape))
    np.testing.assert_array_equal(p["answer_wrong"], golden.t["patch.answer_wrong"].reshape(-1))

    def ref(k):  # a fresh-model value where experiments.safetensors has one (mk_experiments.py)
        return exp.get(f"patch.{k}", golden.t[f"patch.{k}"])

    assert_close(p["clean_metric"], ref("clean_metric").reshape(-1), "clean_metric")
    assert_close(p["corrupt_metric"], ref("corrupt_metric").reshape(-1), "corrupt_metric")
    assert_close(p["resid"], ref("resid"), "patch.resid")
    assert_close(p["resid_attribution"], ref("attrib"), "patch.attrib")
    assert_close(p["heads"], exp["heads"], "patch heads")
    assert_close(p["heads_attribution"], exp["heads_attribution"], "heads_attribution")
    assert len(p.tokens) == p["resid"].shape[1]
    with pytest.raises(nnscope.InputError):
        llama.patch("The quick brown fox", "A fox", " dog", " cat")


def test_gradients_match_torch(llama):
    exp = load(FIXTURES / "llama/experiments.safetensors")
    names = [k[len("grad."):] for k in exp if k.startswith("grad.")]
    assert names
    g = llama.gradients("The quick brown fox jumps over the lazy", names, " dog", wrong=" cat")
    for n in names:
        want = exp[f"grad.{n}"]
        assert g[n].shape == want.shape, n
        d = float(np.abs(g[n].astype(np.float64) - want).max()) / max(float(np.abs(want).max()), 1e-12)
        assert d <= 1e-4, f"gradient w.r.t. {n}: relative difference {d}"
    assert g["value"].shape == ()


def test_direct_logit_attribution_sums_to_the_golden_logit_difference(llama, golden):
    p = llama.patch(golden.prompt, golden.prompt, " dog", " cat")
    a, b = (int(x) for x in p["answer_wrong"])
    logits = golden.t["single.logits"][0, -1]
    want = float(logits[a] - logits[b])
    for heads in (False, True):
        att = llama.direct_logit_attribution(golden.prompt, " dog", " cat", heads=heads)
        assert isinstance(att, nnscope.Attribution)
        assert abs(att.logit_diff - want) <= 1e-4 * max(1.0, abs(want))
        total = sum(att.values()) + att.bias
        assert abs(total - att.logit_diff) <= 1e-3 * max(1.0, abs(want)), (total, att.logit_diff)
        assert ("head.0.0" in att) == heads and "embeddings" in att


def test_patchscope_and_prompts(llama):
    probs = llama.patchscope_lens(["The quick brown fox", "Free software"], layers=[0, 1])
    assert probs.shape == (2, 2, llama.vocab_size) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    texts = llama.patchscope_generate("The quick brown fox", 1, max_new_tokens=2)
    assert len(texts) == 1 and isinstance(texts[0], str)
    r = llama.run_prompts(["The quick brown", "Free"], {"animal": ["fox", "dog"], "x": ["software"]})
    assert set(r) == {"animal", "x"} and r["animal"].shape == (2,)
    rl = llama.run_prompts(["The quick brown"], {"animal": ["fox"]}, per_layer=True)
    assert rl["animal"].shape == (1, llama.num_layers)
    # The last layer's lens is the model's own output.
    np.testing.assert_allclose(
        rl["animal"][0, -1], llama.run_prompts(["The quick brown"], {"animal": ["fox"]})["animal"][0], rtol=1e-4
    )
