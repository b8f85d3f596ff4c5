"""One conftest for the suite. The tests are grouped by kind, each file named after what it tests:

- ``unit/``: the pure-PyTorch packages and the fairseq shells in-process (model, data, checkpoints,
  evaluation, inference, fairseq_ext), tiny sizes, seconds each;
- ``e2e/``: whole runs through ``fairseq-hydra-train`` and the README's own commands (marked ``e2e``);
- ``tools/``: manifest preparation, console scripts, experiment drivers and benchmarks (marked ``tools``).

``helpers.py`` (beside this file) makes the small corpora and runs that several files share. Tests that
need the shared FSDD copy skip without it; ``slow`` tests run with ``make test-all``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# `from helpers import ...` from every folder, and the few tests that reuse another file's builders
# (`from test_api import ...`) find it whichever folder it lives in
for folder in (HERE, HERE / "unit", HERE / "e2e", HERE / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        kind = Path(str(item.fspath)).resolve().relative_to(HERE).parts[0]
        if kind in ("e2e", "tools"):
            item.add_marker(getattr(pytest.mark, kind))
