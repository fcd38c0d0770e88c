"""Type stubs of the native module ``nnscope._nnscope`` (private: use :mod:`nnscope`).

Arrays cross as ``(bytes, shape, dtype)`` triples: native-endian float32 or int64 data. The
``requests`` dict of ``trace``/``generate`` holds ``save``, ``set``, ``edit``, ``stop_after``,
``steer``, ``skip_layers``, ``steps``, ``trampoline``, ``sae`` (``SPEC`` / ``SPEC=HOOK`` strings),
``splice`` and ``clamp`` (``NAME:INDEX=VALUE`` strings).
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple

__version__: str

#: (data, shape, "float32" | "int64")
_Array = Tuple[bytearray, List[int], str]
#: (data, shape) of native-endian int64 or float32 values
_Raw = Tuple[bytes, List[int]]
_Saved = List[Tuple[str, List[_Array]]]

class NativeModel:
    """A loaded model (the native half of :class:`nnscope.Model`)."""

    def __init__(
        self, path: str, dtype: str = "float32", revision: Optional[str] = None, offline: bool = False
    ) -> None: ...
    @property
    def model_type(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    def module_paths(self) -> List[str]: ...
    def expand(self, name: str) -> str: ...
    def source(self, path: str) -> str: ...
    def check(self) -> str:
        """JSON of ``nnscope check --json``."""
    def find_attention_probabilities(self) -> str:
        """JSON of ``nnscope find-attn-probs --json``."""
    def trace(
        self,
        prompts: Optional[Sequence[str]],
        ids: Optional[Tuple[_Raw, Optional[_Raw], Optional[_Raw]]],
        requests: dict,
    ) -> Tuple[_Saved, Optional[_Array], _Array, Optional[_Array]]:
        """(saved, logits, input_ids, attention_mask)."""
    def generate(
        self,
        prompts: Optional[Sequence[str]],
        ids: Optional[Tuple[_Raw, Optional[_Raw], Optional[_Raw]]],
        requests: dict,
        max_new_tokens: int,
        temperature: Optional[float],
        top_k: Optional[int],
        top_p: Optional[float],
        seed: Optional[int],
        ignore_eos: bool,
    ) -> Tuple[_Saved, _Array, List[str], int, Optional[_Array], bool]:
        """(saved as NAME@STEP, output_ids, texts, prompt length, scores, stopped)."""
    def logit_lens(
        self,
        prompts: Optional[Sequence[str]],
        ids: Optional[Tuple[_Raw, Optional[_Raw], Optional[_Raw]]],
        inverse: bool,
    ) -> Tuple[_Array, Optional[_Array], _Array, _Array, Optional[_Array]]:
        """(logits [L, B, T, V], inverse or None, last-position probs [B, L, V], input_ids,
        attention_mask or None)."""
    def patch(
        self, clean: str, corrupt: str, answer: str, wrong: str, heads: bool
    ) -> Tuple[List[Tuple[str, _Array]], List[str]]:
        """(the tensors of ``nnscope patch --out`` by name, the corrupt prompt's tokens)."""
    def patchscope_lens(
        self,
        sources: Sequence[str],
        target: Optional[str],
        index_to_patch: int,
        layers: Optional[Sequence[int]],
        source_position: int,
    ) -> _Array:
        """Probabilities [sources, layers, vocab]."""
    def patchscope_generate(
        self,
        sources: Sequence[str],
        target: Optional[str],
        index_to_patch: int,
        layer: int,
        source_position: int,
        max_new_tokens: int,
    ) -> List[str]: ...
    def direct_logit_attribution(
        self,
        prompts: Optional[Sequence[str]],
        ids: Optional[Tuple[_Raw, Optional[_Raw], Optional[_Raw]]],
        answer: str,
        wrong: str,
        heads: bool,
    ) -> Tuple[List[Tuple[str, float]], float, float, float, float]:
        """(parts, bias, logit_diff, scale, residual_error)."""
    def gradients(
        self,
        prompts: Optional[Sequence[str]],
        ids: Optional[Tuple[_Raw, Optional[_Raw], Optional[_Raw]]],
        wrt: Sequence[str],
        answer: str,
        wrong: Optional[str],
    ) -> Tuple[float, List[Tuple[str, _Array]]]:
        """(the scalar, [(name, gradient)])."""
    def run_prompts(
        self, prompts: Sequence[str], categories: Sequence[Tuple[str, Sequence[str]]], per_layer: bool
    ) -> List[Tuple[str, _Array]]:
        """[(category, probabilities [P] or [P, L])]."""

def keep_freed_memory() -> bool:
    """Keeps freed tensor memory in the process (glibc malloc thresholds; process-wide)."""
