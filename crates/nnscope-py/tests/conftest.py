"""Shared fixtures: the tiny LLaMA checkpoint of tests/fixtures and its Hugging Face goldens."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from safetensors import safe_open

import nnscope

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"


class Golden:
    """A fixture's golden.safetensors (transformers 5.24, eager, float32) read with numpy."""

    def __init__(self, name: str) -> None:
        with safe_open(str(FIXTURES / name / "golden.safetensors"), framework="np") as f:
            self.meta = f.metadata() or {}
            self.t = {k: f.get_tensor(k) for k in f.keys()}

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]

    @property
    def batch(self) -> list:
        return self.meta["batch"].split("\n")


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The fixtures' tolerance for hidden states and logits: 1e-4 x max(1, max |reference|)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    d = float(np.abs(got.astype(np.float64) - want).max())
    assert d <= tol, f"{what}: max difference {d} > {tol}"


def assert_probs_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The fixtures' tolerance for attention probabilities: 1e-5 absolute."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    d = float(np.abs(got.astype(np.float64) - want).max())
    assert d <= 1e-5, f"{what}: max difference {d} > 1e-5"


@pytest.fixture(scope="session")
def llama() -> nnscope.Model:
    return nnscope.Model(str(FIXTURES / "llama"), dtype="float32")


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden("llama")
