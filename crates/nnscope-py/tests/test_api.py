"""The Python API itself: errors, threads, numpy and torch inputs, the model's description."""

from __future__ import annotations

import threading
import traceback

import numpy as np
import pytest

from conftest import FIXTURES, assert_close

import nnscope


# Errors.


def test_a_hookpoint_typo_names_the_nearest_names(llama):
    with pytest.raises(nnscope.HookpointError) as e:
        llama.trace("Hello", save="layers_outptu.0")
    assert isinstance(e.value, KeyError) and isinstance(e.value, nnscope.Error)
    msg = str(e.value)
    assert "layers_outptu" in msg and "did you mean" in msg and "`layers_output`" in msg, msg
    with pytest.raises(nnscope.HookpointError) as e:
        llama.trace("Hello", save="attentions.0.source.attention_interface_9")
    assert "attention_interface_0" in str(e.value)


class Boom(Exception):
    pass


def test_an_exception_in_an_edit_propagates_and_the_model_still_works(llama):
    base = llama.trace("The quick brown fox", save="logits")["logits"]

    def exploding_edit(h):
        raise Boom("from inside the forward")

    with pytest.raises(Boom, match="from inside the forward") as e:
        llama.trace("The quick brown fox", save="logits", edit={"layers_output.0": exploding_edit})
    # The traceback reaches into the user's function.
    frames = [f.name for f in traceback.extract_tb(e.value.__traceback__)]
    assert "exploding_edit" in frames, frames
    # Same model, same answer afterwards; and an edit in generate propagates too.
    np.testing.assert_array_equal(llama.trace("The quick brown fox", save="logits")["logits"], base)
    with pytest.raises(Boom):
        llama.generate("Hi", max_new_tokens=3, edit={"layers_output.1": exploding_edit})
    np.testing.assert_array_equal(llama.trace("The quick brown fox", save="logits")["logits"], base)


def test_other_errors_have_their_classes(llama):
    with pytest.raises(nnscope.ShapeError) as e:
        llama.trace("Hello", edit={"layers_output.0": lambda h: h[:, :1]})
    assert isinstance(e.value, ValueError)
    with pytest.raises(nnscope.ShapeError):
        llama.trace("Hello", set={"layers_output.0": np.zeros((1, 1, 3), np.float32)})
    with pytest.raises(nnscope.LoadError) as e:
        nnscope.Model(str(FIXTURES / "no_such_model"))
    assert isinstance(e.value, OSError) and "no_such_model" in str(e.value)
    with pytest.raises(nnscope.InputError, match="max_new_tokens"):
        llama.generate("Hi", max_new_tokens=0)
    with pytest.raises(nnscope.InputError, match="dtype"):
        nnscope.Model(str(FIXTURES / "llama"), dtype="float8")
    with pytest.raises(nnscope.InputError):
        llama.trace(input_ids=np.array([[1, 2, 100000]]))
    with pytest.raises(TypeError, match="return"):
        llama.trace("Hello", edit={"layers_output.0": lambda h: None})


# Threads.


def test_two_python_threads_trace_one_model(llama, golden):
    prompts = [golden.prompt, golden.batch[0]]
    want = {p: llama.trace(p, save=["logits", "attention_probabilities.1"]) for p in prompts}
    errors, counts = [], [0, 0]

    def worker(i):
        try:
            for _ in range(20):
                p = prompts[i]
                # An edit that needs the GIL inside the forward, on both threads at once.
                out = llama.trace(
                    p, save=["logits", "attention_probabilities.1"], edit={"mlps_output.0": lambda h: h * 1.0}
                )
                for k in ("logits", "attention_probabilities.1"):
                    np.testing.assert_array_equal(out[k], want[p][k])
                counts[i] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert counts == [20, 20]


def test_the_gil_is_released_during_a_forward(llama, golden):
    # With a very long switch interval a thread keeps the GIL until it blocks or releases it. The
    # main thread waits (GIL released) until the worker has started; it can run again only when
    # the worker lets the GIL go: during the forward if the forward releases it (then the trace is
    # not done yet), else only when the worker ends (then it is).
    import sys

    started, done = threading.Event(), []

    def worker():
        started.set()
        llama.trace([golden.prompt] * 64, save="logits")
        done.append(True)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        started.wait()
        finished_before_main_ran = bool(done)
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert done and not finished_before_main_ran


# Inputs.


def test_numpy_inputs(llama, golden):
    ids = golden.t["single.input_ids"]
    want = llama.trace(input_ids=ids, save="logits")["logits"]
    for variant in (ids.astype(np.int32), ids.astype(np.uint32), ids[0], ids.tolist()):
        got = llama.trace(input_ids=variant, save="logits")["logits"]
        np.testing.assert_array_equal(got, want)
    # A float64 array given to `set` is converted; a non-contiguous view too.
    h = llama.trace(input_ids=ids, save="layers_output.0")["layers_output.0"]
    out = llama.trace(input_ids=ids, save="logits", set={"layers_output.0": h.astype(np.float64)})
    np.testing.assert_array_equal(out["logits"], want)
    p = llama.trace(input_ids=ids, save="attention_probabilities.0")["attention_probabilities.0"]
    view = np.asfortranarray(p)
    out = llama.trace(input_ids=ids, save="logits", set={"attention_probabilities.0": view})
    np.testing.assert_array_equal(out["logits"], want)
    # A mask given with ids.
    b = golden.t["batchpos.input_ids"]
    m = golden.t["batchpos.attention_mask"]
    out = llama.trace(input_ids=b, attention_mask=m, save="logits")
    assert_close(out["logits"][m.astype(bool)], golden.t["batchpos.logits"][m.astype(bool)], "batch")


def test_outputs_are_writable_float32_numpy(llama):
    out = llama.trace("Hello there", save=["logits", "layers_output.0"])
    for v in out.values():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.flags.writeable
    assert out.input_ids.dtype == np.int64


def test_torch_inputs(llama, golden):
    torch = pytest.importorskip("torch")
    ids = golden.t["single.input_ids"]
    want = llama.trace(input_ids=ids, save=["logits", "layers_output.0"])
    got = llama.trace(input_ids=torch.from_numpy(ids), save="logits")
    np.testing.assert_array_equal(got["logits"], want["logits"])
    h = torch.from_numpy(want["layers_output.0"]).to(torch.bfloat16).float()
    out = llama.trace(input_ids=torch.tensor(ids), save="logits", set={"layers_output.0": h})
    assert out["logits"].shape == want["logits"].shape
    # An edit returning a torch tensor.
    out = llama.trace(
        input_ids=ids, save="logits", edit={"layers_output.0": lambda x: torch.from_numpy(x) * 1.0}
    )
    np.testing.assert_array_equal(out["logits"], want["logits"])


# The model's description and tools.


def test_model_description(llama):
    assert llama.model_type == "llama"
    assert (llama.num_layers, llama.num_heads, llama.hidden_size, llama.vocab_size) == (2, 4, 64, 512)
    assert llama.dtype == "float32"
    assert "model.layers.0.self_attn" in llama.module_paths()
    assert llama.expand("layers_output.1") == "model.layers.1.output"


def test_source_check_and_discovery(llama):
    listing = llama.source("attentions.0.source.attention_interface_0")
    assert "nn_functional_dropout_0" in listing
    report = llama.check()
    assert report["passed"] is True and report["checks"]["sums"] is True
    found = nnscope.find_attention_probabilities(llama)
    assert found["hookpoint"] == report["hookpoint"]
    assert found["changes_output"] is True


def test_bfloat16_loads_and_traces():
    m = nnscope.Model(str(FIXTURES / "llama"), dtype="bfloat16")
    assert m.dtype == "bfloat16"
    out = m.trace("Hello", save=["logits", "next_token_probs"])
    assert out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["next_token_probs"].sum(), 1.0, atol=1e-3)


def test_stop_after(llama):
    out = llama.trace("Hello", save="layers_output.0", stop_after="layers_output.0")
    assert out.logits is None and out["layers_output.0"].shape[-1] == llama.hidden_size
