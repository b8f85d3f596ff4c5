"""experiments/learning_seeds.py: runs that differ in the pre-training seed, paired split by split."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
import learning_seeds  # noqa: E402

SPLITS = ["a", "b", "c"]


def _row(model: str, layer, pooling: str, folds: list[float]) -> dict:
    return {"model": model, "layer": layer, "pooling": pooling, "logreg": sum(folds) / len(folds),
            "logreg_std": 0.1, "knn": 0.3, "logreg_folds": folds}


def _probe(student_freq_l0: list[float], student_freq_l1: list[float], random: list[float], seed: int) -> dict:
    return {"settings": {"splits": SPLITS, "seed": seed}, "rows": [
        _row("ck.pt:student", 0, "freq", student_freq_l0), _row("ck.pt:student", 1, "freq", student_freq_l1),
        _row(f"random-init(seed {seed})", 0, "freq", random),
        _row("logmel", None, "logmel-mean", [0.1, 0.1, 0.1]), _row("logmel", None, "logmel-meanstd", [0.5, 0.6, 0.4]),
    ]}


# run 1: block 0 is its best (mean 0.6); run 2: block 1 (mean 0.7)
RUN1 = _probe([0.6, 0.7, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.4], seed=1)
RUN2 = _probe([0.3, 0.3, 0.3], [0.8, 0.5, 0.8], [0.4, 0.6, 0.5], seed=2)


def test_each_run_its_best_block_differences_paired_within_the_run() -> None:
    combined = learning_seeds.combine([RUN1, RUN2])
    student = combined["freq"]["student"]
    assert student["layers"] == [0, 1]
    assert student["per_run"] == pytest.approx([60.0, 70.0]) and student["mean"] == pytest.approx(65.0)
    rnd = student["vs"]["random-init"]
    # run 1: +10, +20, +10; run 2: +40, -10, +30 -> per split +25, +5, +20
    assert rnd["per_split"] == pytest.approx([25.0, 5.0, 20.0])
    assert rnd["per_run"] == pytest.approx([40 / 3, 20.0])
    assert rnd["mean"] == pytest.approx(50 / 3)
    assert rnd["sem"] == pytest.approx(10.408329997 / 3 ** 0.5)
    assert rnd["ahead"] == 3
    mel = student["vs"]["logmel"]  # against the mean+std row, log-mel's best
    assert mel["per_split"] == pytest.approx([20.0, 0.0, 25.0]) and mel["ahead"] == 2
    assert combined["freq"]["logmel"]["per_run"] == pytest.approx([50.0, 50.0])
    assert "random-init" not in combined["freq"]["random-init"]["vs"]


def test_runs_on_different_splits_or_without_folds_are_refused() -> None:
    other = json.loads(json.dumps(RUN2))
    other["settings"]["splits"] = ["a", "c", "b"]
    with pytest.raises(ValueError, match="different splits"):
        learning_seeds.combine([RUN1, other])
    no_folds = json.loads(json.dumps(RUN2))
    for row in no_folds["rows"]:
        row.pop("logreg_folds")
    with pytest.raises(ValueError, match="no per-split accuracies"):
        learning_seeds.combine([RUN1, no_folds])


def test_cli_reads_run_folders_and_probe_files(tmp_path, capsys) -> None:
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "results.json").write_text(json.dumps({"probe": RUN1}))
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "probe.json").write_text(json.dumps(RUN2))
    out_json = tmp_path / "combined.json"
    assert learning_seeds.main([str(tmp_path / "seed1"), str(tmp_path / "seed2" / "probe.json"),
                                "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("freq ") and "student" in l)
    assert line.split()[2:5] == ["60.0", "70.0", "65.0"] and "+16.7 (6.0; 3 of 3)" in line
    assert "seed1" in out and "seed2" in out
    assert json.loads(out_json.read_text())["combined"]["freq"]["student"]["mean"] == pytest.approx(65.0)
    (tmp_path / "bad.json").write_text("{}")
    assert learning_seeds.main([str(tmp_path / "bad.json")]) == 2


def test_against_pairs_change_and_base_by_seed_at_their_best_blocks(tmp_path, capsys) -> None:
    # base run, seed 1: best block 1 (mean 0.6); seed 2: block 0 (mean 0.5)
    base1 = _probe([0.5, 0.5, 0.5], [0.7, 0.6, 0.5], [0.5, 0.5, 0.4], seed=1)
    base2 = _probe([0.4, 0.6, 0.5], [0.2, 0.2, 0.2], [0.4, 0.6, 0.5], seed=2)
    arms = learning_seeds.compare_arms([RUN1, RUN2], [base1, base2])
    student = arms["freq"]["student"]
    # seed 1: RUN1 block 0 - base1 block 1 = -10, +10, 0; seed 2: RUN2 block 1 - base2 block 0 = +40, -10, +30
    assert student["per_split"] == pytest.approx([15.0, 0.0, 15.0])
    assert student["per_run"] == pytest.approx([0.0, 20.0])
    assert student["mean"] == pytest.approx(10.0) and student["ahead"] == 2
    assert student["runs"] == pytest.approx([60.0, 70.0]) and student["against"] == pytest.approx([60.0, 50.0])
    with pytest.raises(ValueError, match="different seeds"):
        learning_seeds.compare_arms([RUN1, RUN2], [base2, base1])
    with pytest.raises(ValueError, match="one base run per run"):
        learning_seeds.compare_arms([RUN1, RUN2], [base1])
    for name, probe in {"c1": RUN1, "c2": RUN2, "b1": base1, "b2": base2}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(probe))
    out_json = tmp_path / "arms.json"
    assert learning_seeds.main([str(tmp_path / "c1.json"), str(tmp_path / "c2.json"), "--against",
                                str(tmp_path / "b1.json"), str(tmp_path / "b2.json"), "--json", str(out_json)]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("freq ") and "student" in l][-1]
    assert line.split()[2:5] == ["65.0", "55.0", "+10.0"] and "(5.0; 2 of 3)" in line
    assert json.loads(out_json.read_text())["against"]["combined"]["freq"]["student"]["mean"] == pytest.approx(10.0)
    assert learning_seeds.main([str(tmp_path / "c1.json"), "--against", str(tmp_path / "b2.json")]) == 2
