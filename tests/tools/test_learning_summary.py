"""experiments/learning.py: the summary picks each model's best row overall and per pooling."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
import learning  # noqa: E402


def _row(model: str, layer, pooling: str, acc: float) -> dict:
    return {"model": model, "layer": layer, "pooling": pooling, "logreg": acc, "logreg_std": 0.1, "knn": 0.3}


ROWS = [
    _row("ck.pt:student", 0, "freq", 0.60), _row("ck.pt:student", 1, "freq", 0.58),
    _row("ck.pt:student", 0, "freqstd", 0.66), _row("ck.pt:teacher", 0, "freq", 0.62),
    _row("ck.pt:teacher", 2, "freqstd", 0.68), _row("random-init(seed 1)", 1, "freq", 0.50),
    _row("random-init(seed 1)", 2, "freqstd", 0.61), _row("logmel", None, "logmel-mean", 0.48),
    _row("logmel", None, "logmel-meanstd", 0.565),
]


def test_best_rows_overall_and_per_pooling(capsys) -> None:
    best = learning.summarize(ROWS)
    assert {k: (r["layer"], r["pooling"]) for k, r in best.items()} == {
        "student": (0, "freqstd"), "teacher": (2, "freqstd"), "random-init": (2, "freqstd"),
        "logmel": (None, "logmel-meanstd")}
    by = learning.summarize_by_pooling(ROWS)
    assert list(by) == ["freq", "freqstd"]
    assert by["freq"]["student"]["logreg"] == 0.60 and by["freq"]["random-init"]["logreg"] == 0.50
    assert by["freq"]["logmel"]["pooling"] == "logmel-meanstd"  # log-mel: always its best row
    learning.print_summary(best, by)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("freq ", "freqstd "))}
    assert lines["freq"][1:] == ["60.0", "62.0", "50.0", "56.5", "+10.0", "+3.5", "+12.0", "+5.5"]
    assert lines["freqstd"][5:7] == ["+5.0", "+9.5"]


def test_resume_keeps_the_interrupted_run_and_its_log(tmp_path, monkeypatch) -> None:
    """A new run replaces OUT/pretrain (fairseq would resume a leftover checkpoint); --resume keeps it
    and adds to pretrain.log; --resume without a checkpoint is refused."""
    fake = tmp_path / "fake-hydra-train"
    fake.write_text('#!/bin/sh\necho "fake run $*"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(learning, "_tool", lambda name: str(fake))
    out = tmp_path / "run"
    ckpt = out / "pretrain" / "checkpoint_last.pt"
    ckpt.parent.mkdir(parents=True)

    def args(resume: bool) -> argparse.Namespace:
        return argparse.Namespace(recipe=str(REPO / "examples" / "pretraining" / "eat_small.yaml"), pool="pool",
                                  seed=2, probe_every=0, max_update=None, budget_minutes=None, set=[],
                                  resume=resume)

    ckpt.write_bytes(b"weights")
    (out / "pretrain.log").write_text("the interrupted run\n")
    path, seconds = learning.pretrain(args(True), str(out), dict(os.environ))
    assert path == str(ckpt) and ckpt.read_bytes() == b"weights" and seconds >= 0
    log = (out / "pretrain.log").read_text()
    assert log.startswith("the interrupted run\n") and f"checkpoint.save_dir={ckpt.parent}" in log

    learning.pretrain(args(False), str(out), dict(os.environ))
    assert not ckpt.exists()
    assert "the interrupted run" not in (out / "pretrain.log").read_text()

    with pytest.raises(SystemExit, match="no .*checkpoint_last.pt to resume from"):
        learning.pretrain(args(True), str(out), dict(os.environ))
