"""fairseq registration layer: importing this package registers every eat_* component.

Split by fairseq role: :mod:`.tasks` (``eat_pretraining``, ``eat_classification``), :mod:`.datasets`,
:mod:`.models` (``eat``, ``eat_classifier``), :mod:`.criterions` (``eat_ufo``, ``eat_classification``)
and :mod:`.optim` (``eat_adam``, ``eat_cosine``). Each maps configs onto the pure-PyTorch packages.

fairseq's ``--user-dir`` only auto-imports ``tasks/`` and ``models/`` sub-packages, and
``checkpoint_utils.load_model_ensemble_and_task`` imports nothing at all, so everything is imported
here explicitly and ``import eat_fairseq`` is enough. The checkpoint allow-list (an addition to
torch's ``weights_only`` list, nothing replaced) is installed here, because fairseq loads a checkpoint
before it sets up its task. fairseq's checkpoint writing and resuming are patched
(:mod:`.checkpoint_io`) only when an ``eat_*`` task is set up for training, so other tasks in the same
process keep fairseq's own functions.
"""
from .checkpoint_compat import install_safe_globals

install_safe_globals()

from . import criterions, datasets, models, optim, tasks  # noqa: E402,F401
