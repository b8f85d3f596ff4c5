"""eat_fairseq: EAT (Efficient Audio Transformer, arXiv 2401.03497) for fairseq.

Layout:
- ``eat_fairseq.core``: pure PyTorch (features, masking, encoder, decoder, EMA teacher, targets,
  losses, classifier, weight layouts). Imports no fairseq, so inference works without it.
- ``eat_fairseq.prep``: manifest preparation (library functions; thin CLIs live in ``manifests/``).
- ``eat_fairseq.fairseq_ext``: thin fairseq shells (tasks, models, criterions, datasets).

Importing this package registers every fairseq task, model and criterion when fairseq is
installed: ``checkpoint_utils.load_model_ensemble_and_task`` never imports ``common.user_dir``, so
``import eat_fairseq`` before loading is all a user needs.
"""
from __future__ import annotations

import importlib.util
import os

__version__ = "0.1.0"

USER_DIR = os.path.dirname(os.path.abspath(__file__))
"""The value to pass as ``common.user_dir`` to fairseq-hydra-train (the imported package's folder)."""

from .api import load_model  # noqa: E402  (fairseq-free inference API)

if importlib.util.find_spec("fairseq") is not None:
    try:
        import fairseq as _fairseq  # noqa: F401
    except ImportError:  # a blocked or broken fairseq: the core still works
        _fairseq = None
    if _fairseq is not None:
        from . import fairseq_ext  # noqa: F401  (registers tasks, models, criterions)
