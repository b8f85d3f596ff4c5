"""The audio error, without torch (re-exported by :mod:`eat_fairseq.data.audio`).

Apart so that the row reader (:mod:`eat_fairseq.data.clips`) and the torch-free ONNX runner can
raise it without importing torch.
"""
from __future__ import annotations

__all__ = ["AudioError"]


class AudioError(RuntimeError):
    """An audio file could not be loaded or failed validation; the message names the file."""
