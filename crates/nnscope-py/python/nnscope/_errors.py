"""The exceptions nnscope raises.

Every exception is an :class:`Error`; each kind also subclasses the built-in exception it is
closest to, so ``except KeyError`` around a dictionary-style lookup keeps working.
"""

from __future__ import annotations

__all__ = ["Error", "HookpointError", "ShapeError", "InputError", "LoadError"]


class Error(Exception):
    """Base class of every error nnscope raises; the message is the library's."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class HookpointError(Error, KeyError):
    """A hookpoint path or saved name does not resolve; the message names the nearest valid names."""


class ShapeError(Error, ValueError):
    """A value written at a hookpoint (``set``, ``edit``) has the wrong shape or dtype."""


class InputError(Error, ValueError):
    """Model inputs or options are unusable (empty prompt, bad token ids, bad generation option)."""


class LoadError(Error, OSError):
    """A model could not be loaded: missing folder or hub id, bad config.json, weights or tokenizer."""
