"""A GPU recipe run on a CPU adapts its GPU-only settings with one logged line (issue 23).

custom.yaml asks for fp16 and 8 data-loader workers: on a 2-core CPU that meant half precision at
~10 s per update and ~1,000 lines of DataLoader tracebacks. The guard turns them into CPU settings and
says so once; a run on CUDA is never changed."""
from __future__ import annotations

import logging

import pytest

from helpers import REPO, compose_recipe

FINETUNING = REPO / "examples" / "finetuning"
CUSTOM = ["task.data=/tmp/x", "model.model_path=/tmp/x.pt"]


def _guard():
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.cpu_guard import adapt_to_cpu

    return adapt_to_cpu


def test_custom_recipe_on_cpu_drops_fp16_and_caps_workers_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    adapt_to_cpu = _guard()
    for overrides, cuda in ((["common.cpu=true"], True), ([], False)):  # asked for CPU, or no CUDA at all
        cfg = compose_recipe(FINETUNING, "custom", CUSTOM + overrides)
        assert cfg.common.fp16 and cfg.dataset.num_workers == 8 and cfg.dataset.data_buffer_size > 0
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="eat_fairseq.fairseq_ext.cpu_guard"):
            changes = adapt_to_cpu(cfg.task, cores=2, cuda_available=lambda: cuda)
        assert not cfg.common.fp16 and cfg.dataset.num_workers == 0 and cfg.dataset.data_buffer_size == 0
        assert changes == ["common.fp16 true -> false", "dataset.num_workers 8 -> 0 (2 cores)",
                           "dataset.data_buffer_size 10 -> 0"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and all(change in lines[0] for change in changes), lines
        assert adapt_to_cpu(cfg.task, cores=2, cuda_available=lambda: cuda) == []  # nothing left to change

    cfg = compose_recipe(FINETUNING, "custom", CUSTOM + ["common.bf16=true", "common.fp16=false"])
    assert adapt_to_cpu(cfg.task, cores=16, cuda_available=lambda: False) == [
        "dataset.num_workers 8 -> 4 (16 cores)"]
    assert cfg.common.bf16  # CPUs run bf16: a user who asks for it keeps it
    assert cfg.dataset.data_buffer_size == 10  # workers left: the buffer thread stays


def test_a_cuda_run_and_the_cpu_recipes_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    adapt_to_cpu = _guard()
    cfg = compose_recipe(FINETUNING, "custom", CUSTOM)
    before = dict(cfg.common), dict(cfg.dataset)
    with caplog.at_level(logging.INFO, logger="eat_fairseq.fairseq_ext.cpu_guard"):
        assert adapt_to_cpu(cfg.task, cores=2, cuda_available=lambda: True) == []
    assert (dict(cfg.common), dict(cfg.dataset)) == before and not caplog.records
    for name in ("tiny", "folder_cpu"):
        cfg = compose_recipe(FINETUNING, name, ["task.data=/tmp/x"])
        assert adapt_to_cpu(cfg.task, cores=2, cuda_available=lambda: False) == []


def test_prepare_run_applies_the_guard() -> None:
    """Wired in where every eat_* task starts training (not when a task is rebuilt from a checkpoint)."""
    _guard()
    from eat_fairseq.fairseq_ext import tasks

    cfg = compose_recipe(FINETUNING, "custom", CUSTOM + ["common.cpu=true"])
    tasks.prepare_run(cfg.task, from_checkpoint=True)
    assert cfg.common.fp16
    tasks.prepare_run(cfg.task, from_checkpoint=False)
    assert not cfg.common.fp16 and cfg.dataset.num_workers <= 4
