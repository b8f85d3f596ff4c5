"""benchmarks/learning.py: the summary picks each model's best row overall and per pooling."""
from __future__ import annotations

import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
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
