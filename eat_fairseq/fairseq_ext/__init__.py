"""fairseq registration layer: importing this module registers every eat_* task, model and criterion.

fairseq's ``--user-dir`` only auto-imports ``tasks/`` and ``models/`` sub-packages, and
``checkpoint_utils.load_model_ensemble_and_task`` imports nothing at all, so everything is imported
here explicitly and ``import eat_fairseq`` is enough. The checkpoint allow-list is installed first so
that resuming (including a distributed resume) works under torch's default ``weights_only`` loading,
and fairseq's checkpoint writing is made atomic (:mod:`.checkpoint_io`) before any training starts.
"""
from .checkpoint_compat import install_safe_globals
from .checkpoint_io import install as install_atomic_checkpoints

install_safe_globals()
install_atomic_checkpoints()

from . import classification, data, pretraining  # noqa: E402,F401
