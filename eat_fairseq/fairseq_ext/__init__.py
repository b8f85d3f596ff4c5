"""fairseq registration layer: importing this module registers every eat_* task, model and criterion.

fairseq's ``--user-dir`` only auto-imports ``tasks/`` and ``models/`` sub-packages, and
``checkpoint_utils.load_model_ensemble_and_task`` imports nothing at all, so everything is imported
here explicitly and ``import eat_fairseq`` is enough.
"""
from . import data, pretraining  # noqa: F401
