"""The checkpoint errors, without torch: the torch-free ONNX runner raises them too.

:mod:`eat_fairseq.checkpoints.load` re-exports ``CheckpointError`` and ``UnsafeCheckpointError``,
:mod:`eat_fairseq.inference.api` ``CheckpointError`` and ``ModelLoadError``; ``except CheckpointError``
catches a bad ``.pt`` and a bad ``.onnx`` alike.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "UnsafeCheckpointError", "ModelLoadError"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, truncated or not a checkpoint; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks for a global that could run code; the message names the file and the global."""


class ModelLoadError(CheckpointError):
    """A checkpoint that was read but cannot be turned into a model; the message names the file."""
