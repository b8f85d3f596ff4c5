"""eat_fairseq: EAT (Efficient Audio Transformer, arXiv 2401.03497) for fairseq.

Layout (one folder per concern; everything but ``fairseq_ext`` is pure PyTorch and imports no fairseq,
so inference works without it):
- ``model``: EAT itself (encoder, inverse block masking, CNN decoder, EMA teacher, UFO objective,
  classifier, fine-tuning losses).
- ``data``: audio decoding, manifest rows and the one row reader (``data.clips``), the one
  waveform -> fbank path (``data.features``), augmentation, sampling, labels.
- ``checkpoints``: the one checkpoint reader, conversion to/from the released layout, atomic writes.
- ``evaluation``: linear/kNN probes and metrics.  ``inference``: ``load_model`` and the HEAR API.
- ``prep``: manifest preparation (library functions; thin CLIs live in ``manifests/``).
- ``fairseq_ext``: thin fairseq shells split by fairseq role (tasks, datasets, models, criterions, optim).
- ``cli``: console scripts, the demo and training curves.

Importing this package does NOT import fairseq (or even torch): the inference tools and their
``--help`` stay fast. The fairseq components are still registered whenever fairseq is used: at once
when fairseq is already loaded (``fairseq-hydra-train`` importing this package as
``common.user_dir``), otherwise as soon as fairseq gets imported, so ``import eat_fairseq`` before
``checkpoint_utils.load_model_ensemble_and_task`` is all a user needs (see :mod:`._registration`).
``load_model`` is imported on first use.
"""
from __future__ import annotations

import os
from typing import Any

from . import _registration

__version__ = "0.1.0"

USER_DIR = os.path.dirname(os.path.abspath(__file__))
"""The value to pass as ``common.user_dir`` to fairseq-hydra-train (the imported package's folder)."""

__all__ = ["USER_DIR", "__version__", "load_model"]

_registration.install()


def __getattr__(name: str) -> Any:
    """``eat_fairseq.load_model`` without paying torch's import time on ``import eat_fairseq``."""
    if name == "load_model":
        from .inference.api import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
