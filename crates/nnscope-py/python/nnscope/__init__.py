"""nnscope from Python: read and overwrite what happens inside transformer language models.

A thin, typed layer over the nnscope Rust library. Every call inside a model's forward is a
hookpoint (``attentions.0.source.attention_interface_0.output``), and every architecture has the
standard names (``layers_output.3``, ``attention_probabilities.0``, ``logits``, ...)::

    import nnscope
    model = nnscope.Model("tests/fixtures/llama")
    out = model.trace("The quick brown fox", save=["attention_probabilities.*", "logits"])
    out["attention_probabilities.0"].shape      # (1, heads, tokens, tokens), numpy float32

Sparse autoencoders (SAELens folders or ``org/repo:folder``) attach with ``sae=``; their values are
hookpoints under the hook (``H.sae.feature_acts``, ``H.sae.reconstruction``, ``H.sae.error``)::

    sae = "tests/fixtures/llama/saes/res_post_0"          # hook_name: blocks.0.hook_resid_post
    out = model.trace("The quick brown fox", sae=sae,
                      save="blocks.0.hook_resid_post.sae.feature_acts",
                      clamp="blocks.0.hook_resid_post.sae.feature_acts:12=5.0")

The experiments (logit lens, activation patching, patchscopes, direct logit attribution,
gradients, target-token probabilities) are methods of :class:`Model` returning numpy arrays.

Arrays come back as numpy arrays (float32; token ids int64); torch users can wrap them with
``torch.from_numpy`` without a copy. Inputs accept numpy arrays, torch tensors, or anything
``numpy.asarray`` takes. The GIL is released while a forward runs, so Python threads can trace one
model at once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _nnscope
from ._errors import Error, HookpointError, InputError, LoadError, ShapeError

__all__ = [
    "Model",
    "TraceOutput",
    "GenerateOutput",
    "LensOutput",
    "PatchOutput",
    "Attribution",
    "find_attention_probabilities",
    "keep_freed_memory",
    "Error",
    "HookpointError",
    "ShapeError",
    "InputError",
    "LoadError",
]

__version__: str = _nnscope.__version__

#: What an array argument may be: a numpy array, a torch tensor, or anything ``numpy.asarray`` takes.
ArrayLike = Any
#: An ``edit`` function: takes the hookpoint's value as a float32 numpy array, returns the new value
#: (same shape; a numpy array, torch tensor or anything ``numpy.asarray`` takes).
EditFn = Callable[[np.ndarray], ArrayLike]
#: A steering request: ``{"layers": [int, ...], "vector": array [hidden], "factor": float = 1.0,
#: "positions": [int, ...] | None}``.
Steer = Mapping[str, Any]
#: An SAE to attach: a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or a hub spec
#: ``"org/repo:folder"``, attached at its cfg.json's ``hook_name``; ``"SPEC=HOOK"`` attaches it at
#: hookpoint ``HOOK`` instead (a standard name, a TransformerLens name or any path).
SaeSpec = Union[str, "os.PathLike[str]"]
#: A clamp: ``"NAME:INDEX=VALUE"`` or ``(name, index, value)``: element ``index`` of the last axis
#: of the value at ``name`` set to ``value`` at every position (an SAE feature, an MLP neuron, a
#: residual dimension).
ClampSpec = Union[str, Tuple[str, int, float]]


def _to_numpy(x: ArrayLike, dtype: Any) -> np.ndarray:
    """``x`` as a C-contiguous numpy array of ``dtype``: numpy arrays as they are, torch tensors
    through ``.detach().cpu()`` (bfloat16 widened first), anything else through ``numpy.asarray``."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
            t = x.detach().cpu()
            if getattr(t, "is_floating_point", lambda: False)() and str(t.dtype) == "torch.bfloat16":
                t = t.float()
            x = t.numpy()
        elif not hasattr(x, "__array__") and hasattr(x, "numpy"):
            x = x.numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise InputError(f"cannot make an array of a {type(x).__name__}")
    return np.ascontiguousarray(a, dtype=dtype)


def _floats(name: str, x: ArrayLike) -> Tuple[bytes, List[int]]:
    a = _to_numpy(x, np.float32)
    return a.tobytes(), list(a.shape)


def _ints(name: str, x: ArrayLike) -> Tuple[bytes, List[int]]:
    a = _to_numpy(x, None)
    if a.dtype.kind not in "iub":
        raise InputError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    a = np.ascontiguousarray(a, dtype=np.int64)
    return a.tobytes(), list(a.shape)


def _array(a: Tuple[bytearray, List[int], str]) -> np.ndarray:
    """An array from the native module: (bytes, shape, dtype) as a writable numpy array, no copy."""
    buf, shape, dtype = a
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)


def _edit_call(fn: EditFn, buf: bytearray, shape: List[int]) -> Tuple[bytes, List[int]]:
    """Runs a user's ``edit`` on a hookpoint's value (called from inside the forward)."""
    value = np.frombuffer(buf, dtype=np.float32).reshape(shape)
    out = fn(value)
    if out is None:
        raise TypeError(
            "an edit function must return the new value (got None; did you modify the array in "
            "place and forget `return`?)"
        )
    a = _to_numpy(out, np.float32)
    return a.tobytes(), list(a.shape)


def _names(save: Union[str, Sequence[str], None], num_layers: int) -> List[str]:
    """Names as given, ``*`` in place of a layer index expanded to every layer, duplicates dropped."""
    if save is None:
        return []
    if isinstance(save, str):
        save = [save]
    out: List[str] = []
    for name in save:
        if not isinstance(name, str):
            raise InputError(f"save names must be strings, got {type(name).__name__}")
        parts = name.split(".")
        expanded = (
            [".".join(str(i) if p == "*" else p for p in parts) for i in range(num_layers)]
            if "*" in parts
            else [name]
        )
        for n in expanded:
            if n not in out:
                out.append(n)
    return out


def _saes(sae: Union[SaeSpec, Sequence[SaeSpec], None]) -> List[str]:
    if sae is None:
        return []
    if isinstance(sae, (str, os.PathLike)):
        sae = [sae]
    out = []
    for s in sae:
        if not isinstance(s, (str, os.PathLike)):
            raise InputError(f"sae takes a path, a hub spec org/repo:folder, or a list of them; got {type(s).__name__}")
        out.append(os.fspath(s))
    return out


def _clamps(clamp: Union[ClampSpec, Sequence[ClampSpec], None]) -> List[str]:
    """Clamps as ``NAME:INDEX=VALUE`` strings (parsed, and checked, by the Rust library)."""
    if clamp is None:
        return []
    if isinstance(clamp, str) or (
        isinstance(clamp, tuple) and len(clamp) == 3 and isinstance(clamp[0], str)
    ):
        clamp = [clamp]
    out = []
    for c in clamp:
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, (tuple, list)) and len(c) == 3:
            name, index, value = c
            out.append(f"{name}:{int(index)}={float(value)!r}")
        else:
            raise InputError(
                'clamp takes "NAME:INDEX=VALUE", (name, index, value), or a list of them'
            )
    return out


def _steers(steer: Union[Steer, Sequence[Steer], None]) -> list:
    if steer is None:
        return []
    if isinstance(steer, Mapping):
        steer = [steer]
    out = []
    for s in steer:
        if not isinstance(s, Mapping) or "layers" not in s or "vector" not in s:
            raise InputError(
                'steer takes {"layers": [...], "vector": array, "factor": 1.0, "positions": None} '
                "or a list of them"
            )
        unknown = set(s) - {"layers", "vector", "factor", "positions"}
        if unknown:
            raise InputError(f"steer: unknown keys {sorted(unknown)}")
        layers = s["layers"]
        layers = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(l) for l in layers]
        b, shape = _floats("steer vector", s["vector"])
        pos = s.get("positions")
        pos = None if pos is None else [int(p) for p in pos]
        out.append((layers, b, shape, float(s.get("factor", 1.0)), pos))
    return out


class TraceOutput(Dict[str, np.ndarray]):
    """What a trace saved: a dict from each requested name (``*`` expanded per layer) to a numpy
    array. A hookpoint that ran more than once in the forward also gives ``NAME#1``, ``NAME#2``, ...

    Attributes:
        input_ids: the token ids that ran, int64 [batch, tokens].
        attention_mask: the attention mask, int64 [batch, tokens] (``None`` for ids given without one).
        logits: the logits, float32 [batch, tokens, vocab], when they were saved (``None`` otherwise,
            and when the forward stopped early).
    """

    input_ids: np.ndarray
    attention_mask: Optional[np.ndarray]
    logits: Optional[np.ndarray]


class GenerateOutput(Dict[str, np.ndarray]):
    """What a generation produced: a dict holding ``output_ids`` (int64 [batch, prompt + new]: the
    prompt ids as given, left padding kept, then the new tokens) and every save as ``NAME@STEP``
    (float32), the names of ``nnscope generate --out``. Step 0 is the forward over the prompt, step
    S the forward over the S-th new token.

    Attributes:
        text: each row's continuation, decoded (empty strings without a tokenizer).
        prompt_len: the padded prompt length (new tokens start at this column of ``output_ids``).
        scores: the float32 logits each new token was picked from, [new, batch, vocab].
        stopped: whether a ``stop_after`` request ended the generation early.
    """

    text: List[str]
    prompt_len: int
    scores: Optional[np.ndarray]
    stopped: bool


class LensOutput(Dict[str, np.ndarray]):
    """What :meth:`Model.logit_lens` produced, as numpy arrays:

    - ``logits``: float32 [layers, batch, tokens, vocab], each layer's output through the model's
      own final norm and head;
    - ``probs``: float32 [batch, layers, vocab], the softmax at each row's last position (nnterp's
      ``logit_lens`` return value);
    - ``inverse``: float32 [layers, batch, tokens, vocab], ``lm_head(-ln_final(h))`` (nnterp's
      inverse logits), with ``inverse=True`` only;
    - ``input_ids``: int64 [batch, tokens]; ``attention_mask``: int64 [batch, tokens], when there
      is one.
    """


class PatchOutput(Dict[str, np.ndarray]):
    """What :meth:`Model.patch` measured, under the names ``nnscope patch --out`` writes:
    ``clean_ids``, ``corrupt_ids`` (int64 [1, T]), ``answer_wrong`` (int64 [2]: the answers' first
    tokens), ``clean_metric``, ``corrupt_metric`` (float32 [1]: the logit difference),
    ``resid`` (float32 [layers, T]: the metric with ``layers_output.L`` at one position patched
    from the clean run), ``resid_attribution`` (float32 [layers, T]: attribution patching), and
    with ``heads=True`` ``heads`` and ``heads_attribution`` (float32 [layers, heads]).

    Attributes:
        tokens: the corrupt prompt's tokens as text (axis labels).
    """

    tokens: List[str]


class Attribution(Dict[str, float]):
    """Direct logit attribution (:meth:`Model.direct_logit_attribution`): a dict from each part
    (``embeddings``, then per layer ``attention.L`` or ``head.L.H`` and ``attention_bias.L``, and
    ``mlp.L``) to its contribution to the logit difference, in order.

    Attributes:
        bias: the final norm's and the head's biases, projected.
        logit_diff: the model's ``logits[last, answer] - logits[last, wrong]`` (equals the sum of
            the parts and ``bias``).
        scale: the final norm's frozen scale.
        residual_error: how exactly the parts decompose the final residual (relative).
    """

    bias: float
    logit_diff: float
    scale: float
    residual_error: float


def _saved_into(out: dict, saved: list) -> None:
    for name, values in saved:
        for i, v in enumerate(values):
            out[name if i == 0 else f"{name}#{i}"] = _array(v)


class Model:
    """A loaded causal language model.

    Args:
        path: a folder with config.json, safetensors weights and tokenizer.json, or a Hugging Face
            Hub id (``owner/name``) taken from the local cache or downloaded into it (``HF_TOKEN``
            for gated models, ``HF_HUB_OFFLINE=1`` to never download).
        dtype: compute dtype, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        revision: branch, tag or commit of a hub id (default ``main``).
        offline: never download; a hub id must be in the local cache.

    Raises:
        LoadError: the model cannot be found or its files are unusable.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        *,
        revision: Optional[str] = None,
        offline: bool = False,
    ) -> None:
        self._m = _nnscope.NativeModel(str(path), dtype, revision, offline)

    def __repr__(self) -> str:
        return repr(self._m)

    @property
    def model_type(self) -> str:
        """config.json's ``model_type`` (``"llama"``, ``"gpt2"``, ...)."""
        return self._m.model_type

    @property
    def architecture(self) -> str:
        """The Hugging Face class (config.json's ``architectures[0]``)."""
        return self._m.architecture

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return self._m.num_layers

    @property
    def num_heads(self) -> int:
        """Number of attention heads."""
        return self._m.num_heads

    @property
    def hidden_size(self) -> int:
        """Hidden size."""
        return self._m.hidden_size

    @property
    def vocab_size(self) -> int:
        """Vocabulary size."""
        return self._m.vocab_size

    @property
    def dtype(self) -> str:
        """Compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
        return self._m.dtype

    @property
    def path(self) -> str:
        """The folder the model was loaded from."""
        return self._m.path

    def module_paths(self) -> List[str]:
        """Every module's Hugging Face path (``model.layers.0.self_attn``), in construction order;
        the root module is ``""``. Each is a hookpoint: ``PATH.output``, ``PATH.input``."""
        return list(self._m.module_paths())

    def expand(self, name: str) -> str:
        """The hookpoint path a standard name stands for (``layers_output.0`` ->
        ``model.layers.0.output``); other paths are returned unchanged.

        Raises:
            HookpointError: a standard name with a bad layer index.
        """
        return self._m.expand(name)

    def source(self, path: str) -> str:
        """The source listing of a module's forward or of a nested call with its hookpoints, as
        ``nnscope source`` prints it (``"attentions.0"``,
        ``"attentions.0.source.attention_interface_0"``).

        Raises:
            HookpointError: the path does not resolve (the message names the nearest).
        """
        return self._m.source(path)

    def check(self) -> Dict[str, Any]:
        """Checks the attention-probability hookpoint (it resolves, has the expected shape, its
        rows sum to 1, changing it changes the output): the ``nnscope check --json`` object."""
        return json.loads(self._m.check())

    def trace(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        input_ids: Optional[ArrayLike] = None,
        attention_mask: Optional[ArrayLike] = None,
        position_ids: Optional[ArrayLike] = None,
        save: Union[str, Sequence[str], None] = None,
        set: Optional[Mapping[str, ArrayLike]] = None,
        edit: Optional[Mapping[str, EditFn]] = None,
        stop_after: Optional[str] = None,
        steer: Union[Steer, Sequence[Steer], None] = None,
        skip_layers: Optional[Sequence[int]] = None,
        sae: Union[SaeSpec, Sequence[SaeSpec], None] = None,
        splice: bool = False,
        clamp: Union[ClampSpec, Sequence[ClampSpec], None] = None,
    ) -> TraceOutput:
        """Runs the model once and returns what ``save`` asked for.

        Args:
            prompt: a prompt, or a list of prompts (tokenized and left-padded into one batch).
            input_ids: token ids [batch, tokens] (or [tokens]) instead of prompts: a numpy integer
                array, a torch tensor, or a nested list.
            attention_mask: 0/1 mask [batch, tokens] for ``input_ids`` (1 for real tokens).
            position_ids: explicit positions [batch, tokens] (default ``cumsum(mask) - 1``, so a row
                of a left-padded batch equals its prompt alone).
            save: names to save: standard names (``"layers_output.3"``,
                ``"attention_probabilities.-1"``, ``"logits"``), ``"next_token_probs"`` (softmax of
                the last position's logits, [batch, vocab]) or any hookpoint path; ``*`` in place of
                a layer index means every layer.
            set: hookpoint -> array replacing its value (same shape).
            edit: hookpoint -> function run inside the forward on the value (a float32 numpy
                array), returning the new value (same shape). An exception it raises propagates
                out of ``trace`` with its traceback, and the model stays usable.
            stop_after: stop the forward right after this hookpoint (``logits`` are then absent).
            steer: ``{"layers": [...], "vector": array [hidden], "factor": 1.0, "positions": None}``
                or a list of them: adds ``factor * vector`` to those layers' outputs (nnterp's
                ``steer``).
            skip_layers: layers made the identity (nnterp's ``skip_layer``).
            sae: sparse autoencoders or transcoders to attach: a SAELens folder, a hub spec
                ``"org/repo:folder"``, or ``"SPEC=HOOK"`` to attach at another hookpoint; or a list
                of them. Each adds ``HOOK.sae.feature_acts`` [batch, tokens, d_sae] (writable:
                ``set``/``edit``/``clamp`` it, the reconstruction error kept),
                ``HOOK.sae.reconstruction`` and ``HOOK.sae.error`` to what ``save`` takes;
                attaching alone changes nothing downstream.
            splice: replace each attached SAE's hook value (a transcoder's output hook) by its
                reconstruction (TransformerLens' ``run_with_saes``).
            clamp: ``"NAME:INDEX=VALUE"`` or ``(name, index, value)``, or a list of them: element
                INDEX of NAME's last axis set to VALUE at every position (an SAE feature, an MLP
                neuron, a residual dimension); as ``nnscope run --clamp``.

        Requests are applied in this order: ``sae``, ``clamp``, ``set``, ``edit``, ``steer``,
        ``skip_layers``, then ``save`` (so a save sees the edited value) and ``stop_after``.

        Returns:
            A :class:`TraceOutput`: each requested name to a float32 numpy array.

        Raises:
            HookpointError: a name does not resolve (the message names the nearest valid names).
            ShapeError: a ``set`` or ``edit`` value has the wrong shape.
            InputError: the inputs are unusable.
        """
        names = _names(save, self.num_layers)
        prompts, ids = self._input(prompt, input_ids, attention_mask, position_ids)
        native_saves = [n for n in names if n != "next_token_probs"]
        if "next_token_probs" in names and "logits" not in native_saves:
            native_saves.append("logits")
        req = self._requests(
            native_saves, set, edit, stop_after, steer, skip_layers, None, sae, splice, clamp
        )
        saved, logits, ids_out, mask_out = self._m.trace(prompts, ids, req)
        got: Dict[str, np.ndarray] = {}
        _saved_into(got, saved)
        out = TraceOutput()
        for n in names:
            if n == "next_token_probs":
                if "logits" not in got:
                    raise InputError("next_token_probs: the trace stopped before the logits")
                last = got["logits"][:, -1, :].astype(np.float64)
                e = np.exp(last - last.max(axis=-1, keepdims=True))
                out[n] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
            else:
                out[n] = got[n]
        for n, v in got.items():  # repeated firings (NAME#1, ...)
            if "#" in n and n.split("#")[0] in out:
                out[n] = v
        out.input_ids = _array(ids_out)
        out.attention_mask = None if mask_out is None else _array(mask_out)
        out.logits = got.get("logits")
        return out

    def generate(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        input_ids: Optional[ArrayLike] = None,
        attention_mask: Optional[ArrayLike] = None,
        max_new_tokens: int = 16,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        ignore_eos: bool = False,
        save: Union[str, Sequence[str], None] = None,
        set: Optional[Mapping[str, ArrayLike]] = None,
        edit: Optional[Mapping[str, EditFn]] = None,
        stop_after: Optional[str] = None,
        steer: Union[Steer, Sequence[Steer], None] = None,
        skip_layers: Optional[Sequence[int]] = None,
        steps: Optional[Tuple[int, Optional[int]]] = None,
        sae: Union[SaeSpec, Sequence[SaeSpec], None] = None,
        splice: bool = False,
        clamp: Union[ClampSpec, Sequence[ClampSpec], None] = None,
    ) -> GenerateOutput:
        """Generates tokens with the key/value cache, serving the requests at every step.

        Args:
            prompt: a prompt or a list of prompts (left-padded into one batch).
            input_ids: token ids [batch, tokens] instead of prompts; ``attention_mask`` likewise.
            max_new_tokens: how many new tokens (at least 1).
            temperature, top_k, top_p: sampling (greedy when none is given), as transformers'
                warpers in that order.
            seed: seed of the sampler (the same seed gives the same tokens).
            ignore_eos: keep generating after end-of-sequence tokens.
            save, set, edit, stop_after, steer, skip_layers, sae, splice, clamp: as in
                :meth:`trace`, at every step; a save keeps one value per step, named
                ``NAME@STEP``.
            steps: ``(start, end)`` (end excluded) or ``(start, None)``: limit every request to
                those steps (nnsight's ``tracer.iter[start:end]``). Step 0 is the prompt's forward.

        Returns:
            A :class:`GenerateOutput`: ``output_ids`` and ``NAME@STEP`` arrays, with ``.text``.

        Raises:
            InputError: a bad option (``max_new_tokens=0``, ``top_p`` outside (0, 1], ...).
            HookpointError, ShapeError: as in :meth:`trace`.
        """
        names = _names(save, self.num_layers)
        if "next_token_probs" in names:
            raise InputError("next_token_probs is a trace output; in generate use `.scores`")
        prompts, ids = self._input(prompt, input_ids, attention_mask, None)
        if steps is not None:
            if len(steps) != 2:
                raise InputError("steps takes (start, end) or (start, None)")
            steps = (int(steps[0]), None if steps[1] is None else int(steps[1]))
        req = self._requests(
            names, set, edit, stop_after, steer, skip_layers, steps, sae, splice, clamp
        )
        saved, output_ids, texts, prompt_len, scores, stopped = self._m.generate(
            prompts, ids, req, int(max_new_tokens), temperature, top_k, top_p, seed,
            bool(ignore_eos),
        )
        out = GenerateOutput()
        out["output_ids"] = _array(output_ids)
        _saved_into(out, saved)
        out.text = list(texts)
        out.prompt_len = prompt_len
        out.scores = None if scores is None else _array(scores)
        out.stopped = stopped
        return out

    # Experiments (nnscope::experiments): the Rust library computes, these convert.

    def logit_lens(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        input_ids: Optional[ArrayLike] = None,
        attention_mask: Optional[ArrayLike] = None,
        inverse: bool = False,
    ) -> LensOutput:
        """The logit lens: every layer's output read through the model's own final norm and output
        head (``nnscope lens``; matches transformers within 1e-4 relative on the fixtures).

        Args:
            prompt: a prompt or a list of prompts (left-padded), or ``input_ids`` [batch, tokens]
                (with an optional ``attention_mask``).
            inverse: also compute nnterp's inverse logits ``lm_head(-ln_final(h))``.

        Returns:
            A :class:`LensOutput`: ``logits`` [layers, batch, tokens, vocab], ``probs`` [batch,
            layers, vocab] (last position), ``inverse`` (when asked), ``input_ids``,
            ``attention_mask``.
        """
        prompts, ids = self._input(prompt, input_ids, attention_mask, None)
        logits, inv, probs, ids_out, mask = self._m.logit_lens(prompts, ids, bool(inverse))
        out = LensOutput()
        out["logits"] = _array(logits)
        out["probs"] = _array(probs)
        if inv is not None:
            out["inverse"] = _array(inv)
        out["input_ids"] = _array(ids_out)
        if mask is not None:
            out["attention_mask"] = _array(mask)
        return out

    def patch(
        self, clean: str, corrupt: str, answer: str, wrong: str, *, heads: bool = False
    ) -> PatchOutput:
        """Activation and attribution patching (TransformerLens' ``patching.py``; ``nnscope
        patch``): the metric is ``logits[last, answer] - logits[last, wrong]`` (first tokens of
        each answer).

        Args:
            clean: the prompt values are taken from.
            corrupt: the prompt that is patched (same number of tokens as ``clean``).
            answer, wrong: the right and the wrong answer (their first tokens count).
            heads: also patch each attention head's output (``heads``, ``heads_attribution``).

        Returns:
            A :class:`PatchOutput` (``resid`` [layers, tokens], ...), with ``.tokens``.

        Raises:
            InputError: prompts of different token lengths, an answer without tokens.
        """
        named, tokens = self._m.patch(str(clean), str(corrupt), str(answer), str(wrong), bool(heads))
        out = PatchOutput()
        for n, a in named:
            out[n] = _array(a)
        out.tokens = list(tokens)
        return out

    def patchscope_lens(
        self,
        sources: Union[str, Sequence[str]],
        *,
        target: Optional[str] = None,
        index_to_patch: int = -1,
        layers: Optional[Sequence[int]] = None,
        source_position: int = -1,
    ) -> np.ndarray:
        """nnterp's ``patchscope_lens``: for each source prompt and layer L, the source's
        ``layers_output.L`` at ``source_position`` written into the target prompt at
        ``index_to_patch`` and layer L.

        Args:
            sources: a prompt or a list of prompts.
            target: the target prompt (default nnterp's ``repeat_prompt``:
                ``"king king\n1135 1135\nhello hello\n?"``, its last token patched).
            index_to_patch: the target position (negative counts from the end).
            layers: which layers (default every layer).
            source_position: the source position (negative counts from the end).

        Returns:
            float32 [sources, layers, vocab]: the target's next-token probabilities.
        """
        sources = [sources] if isinstance(sources, str) else list(sources)
        layers = None if layers is None else [int(l) for l in layers]
        return _array(
            self._m.patchscope_lens(
                sources, target, int(index_to_patch), layers, int(source_position)
            )
        )

    def patchscope_generate(
        self,
        sources: Union[str, Sequence[str]],
        layer: int,
        *,
        target: Optional[str] = None,
        index_to_patch: int = -1,
        source_position: int = -1,
        max_new_tokens: int = 8,
    ) -> List[str]:
        """nnterp's ``patchscope_generate``: the target's greedy continuation with each source's
        ``layers_output.layer`` (at ``source_position``) written into it. One text per source."""
        sources = [sources] if isinstance(sources, str) else list(sources)
        return list(
            self._m.patchscope_generate(
                sources, target, int(index_to_patch), int(layer), int(source_position),
                int(max_new_tokens),
            )
        )

    def direct_logit_attribution(
        self,
        prompt: Optional[str] = None,
        answer: str = "",
        wrong: str = "",
        *,
        input_ids: Optional[ArrayLike] = None,
        heads: bool = False,
    ) -> Attribution:
        """Direct logit attribution of ``logits[last, answer] - logits[last, wrong]`` on the
        prompt (row 0): the final residual split into embeddings, attention (per head with
        ``heads=True``) and MLP outputs, each projected with the final norm's scale frozen
        (``nnscope dla``).

        Returns:
            An :class:`Attribution`: part -> contribution, with ``.bias``, ``.logit_diff``,
            ``.scale`` and ``.residual_error``.
        """
        prompts, ids = self._input(prompt, input_ids, None, None)
        parts, bias, diff, scale, err = self._m.direct_logit_attribution(
            prompts, ids, str(answer), str(wrong), bool(heads)
        )
        out = Attribution()
        for n, v in parts:
            out[n] = float(v)
        out.bias, out.logit_diff, out.scale, out.residual_error = bias, diff, scale, err
        return out

    def gradients(
        self,
        prompt: Optional[str] = None,
        wrt: Union[str, Sequence[str]] = (),
        answer: str = "",
        wrong: Optional[str] = None,
        *,
        input_ids: Optional[ArrayLike] = None,
    ) -> Dict[str, np.ndarray]:
        """Gradients of ``logits[0, last, answer]`` (minus ``wrong``'s when given; first tokens)
        with respect to each hookpoint in ``wrt`` (standard names or paths, ``*`` patterns),
        through candle's autograd (``nnscope grad``).

        Returns:
            name -> float32 gradient (same shape as the value), plus ``"value"``: the scalar
            (a 0-d float64 array).
        """
        wrt = [wrt] if isinstance(wrt, str) else list(wrt)
        prompts, ids = self._input(prompt, input_ids, None, None)
        value, grads = self._m.gradients(prompts, ids, wrt, str(answer), wrong)
        out: Dict[str, np.ndarray] = {n: _array(a) for n, a in grads}
        out["value"] = np.array(value, dtype=np.float64)
        return out

    def run_prompts(
        self,
        prompts: Union[str, Sequence[str]],
        targets: Mapping[str, Sequence[str]],
        *,
        per_layer: bool = False,
    ) -> Dict[str, np.ndarray]:
        """nnterp's ``run_prompts``: for each category of ``targets`` (name -> words; a word's
        tokens are the first token of ``word`` and of ``" " + word``), the probability of its
        tokens at each prompt's last position (``nnscope prompts``).

        Returns:
            category -> float32 [prompts], or [prompts, layers] through the logit lens with
            ``per_layer=True``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cats = [(str(k), [str(w) for w in v]) for k, v in targets.items()]
        return {n: _array(a) for n, a in self._m.run_prompts(prompts, cats, bool(per_layer))}

    # Helpers.

    @staticmethod
    def _input(prompt: Any, input_ids: Any, attention_mask: Any, position_ids: Any) -> tuple:
        if prompt is not None and input_ids is not None:
            raise InputError("give a prompt or input_ids, not both")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise InputError("prompts must be strings (pass token ids as input_ids=...)")
            return prompts, None
        if input_ids is None:
            raise InputError("give a prompt, a list of prompts, or input_ids")
        ids = _ints("input_ids", input_ids)
        mask = None if attention_mask is None else _ints("attention_mask", attention_mask)
        pos = None if position_ids is None else _ints("position_ids", position_ids)
        return None, (ids, mask, pos)

    @staticmethod
    def _requests(
        save: List[str],
        set: Optional[Mapping[str, ArrayLike]],
        edit: Optional[Mapping[str, EditFn]],
        stop_after: Optional[str],
        steer: Any,
        skip_layers: Optional[Sequence[int]],
        steps: Optional[Tuple[int, Optional[int]]],
        sae: Any = None,
        splice: bool = False,
        clamp: Any = None,
    ) -> dict:
        sets = [(k, *_floats(k, v)) for k, v in (set or {}).items()]
        edits = []
        for k, f in (edit or {}).items():
            if not callable(f):
                raise InputError(f"edit `{k}`: expected a function, got {type(f).__name__}")
            edits.append((k, f))
        return {
            "save": save,
            "set": sets,
            "edit": edits,
            "stop_after": stop_after,
            "steer": _steers(steer),
            "skip_layers": [int(l) for l in (skip_layers or [])],
            "steps": steps,
            "trampoline": _edit_call,
            "sae": _saes(sae),
            "splice": bool(splice),
            "clamp": _clamps(clamp),
        }


def find_attention_probabilities(model: Model) -> Dict[str, Any]:
    """Finds the attention-probability hookpoint of ``model``'s architecture by tracing it (never
    reading the registry): the ``nnscope find-attn-probs --json`` object (``hookpoint``, ``shape``,
    ``row_sum_min``/``row_sum_max``, ``changes_output``, ``candidates``, ...)."""
    return json.loads(model._m.find_attention_probabilities())


def keep_freed_memory() -> bool:
    """Keeps freed tensor memory in the process between operations instead of returning it to the
    OS (glibc; about 15% faster CPU forwards on larger inputs). Process-wide, hence opt-in.
    Returns whether it took effect."""
    return _nnscope.keep_freed_memory()
