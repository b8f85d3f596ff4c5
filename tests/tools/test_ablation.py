"""experiments/ablation.py: the seconds-per-update reading of fairseq's log, and the table over finished
runs (best and last block, differences to random init, log-mel and the base variant, paired by seed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
import ablation  # noqa: E402

SPLITS = ["a", "b", "c"]


def _row(model: str, layer, pooling: str, folds: list[float]) -> dict:
    return {"model": model, "layer": layer, "pooling": pooling, "logreg": sum(folds) / len(folds),
            "logreg_std": 0.1, "knn": 0.3, "logreg_folds": folds}


def _probe(best: list[float], last: list[float], seed: int) -> dict:
    """Block 0 is the student's best (``best``), block 1 its last; random init 0.4 and log-mel 0.5 on
    every split."""
    return {"settings": {"splits": SPLITS, "seed": seed}, "rows": [
        _row("ck.pt:student", 0, "freq", best), _row("ck.pt:student", 1, "freq", last),
        _row(f"random-init(seed {seed})", 0, "freq", [0.4] * 3),
        _row("logmel", None, "logmel-meanstd", [0.5] * 3),
    ]}


def _write_run(out: Path, variant: str, seed: int, probe: dict) -> None:
    folder = out / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "probe_set1.json").write_text(json.dumps(probe))
    (folder / "run.json").write_text(json.dumps({
        "variant": variant, "seed": seed, "equal": "updates", "probes": {"set1": {"json": "probe_set1.json"}}}))


def test_seconds_per_update_from_fairseq_log_lines() -> None:
    lines = ["epoch 001:     20 / 887 loss=2.1, num_updates=20, lr=1e-4, gnorm=1.2, train_wall=5, wall=10",
             "epoch 001:     40 / 887 loss=2.0, num_updates=40, lr=2e-4, gnorm=1.1, train_wall=5, wall=16",
             "epoch 001:     60 / 887 loss=1.9, num_updates=60, lr=3e-4, gnorm=1.0, train_wall=5, wall=22"]
    assert ablation._log_rate(lines, fallback=999.0) == pytest.approx(0.3)
    assert ablation._log_rate(lines[:1], fallback=60.0) == pytest.approx(1.0)  # too few points: whole run / 60


def test_table_pairs_variants_with_base_by_seed(tmp_path: Path) -> None:
    _write_run(tmp_path, "base", 1, _probe([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], 1))
    _write_run(tmp_path, "base", 2, _probe([0.7, 0.7, 0.7], [0.6, 0.6, 0.6], 2))
    _write_run(tmp_path, "frame_only", 1, _probe([0.7, 0.8, 0.6], [0.6, 0.6, 0.6], 1))
    _write_run(tmp_path, "frame_only", 2, _probe([0.8, 0.9, 0.7], [0.7, 0.7, 0.7], 2))
    text, numbers = ablation.tabulate(str(tmp_path))
    base = next(line for line in text.splitlines() if line.startswith("| base |"))
    # best 65.0, last 55.0, random 40.0, log-mel 50.0; +25.0 over random init, +15.0 over log-mel
    assert "| 65.0 | 55.0 | 40.0 | 50.0 | +25.0 (0.0; 3 of 3) | +15.0 (0.0; 3 of 3) | - |" in base
    frame = next(line for line in text.splitlines() if line.startswith("| frame_only |"))
    # per split, paired by seed: (0.1 + 0.1) / 2, (0.2 + 0.2) / 2, 0 -> mean +10.0, SE 5.8, 2 splits ahead
    assert frame.endswith("| +10.0 (5.8; 2 of 3) |")
    assert numbers["set1"]["frame_only"]["freq"]["seeds"] == [1, 2]


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown variants"):
        ablation.main(["run", "--pool", str(tmp_path), "--out", str(tmp_path / "o"), "--set", f"a={tmp_path}",
                       "--variants", "base,bigger_decoder"])


def test_per_seed_target_table_needs_every_seed_ahead(tmp_path: Path) -> None:
    # seed 1 beats random init (0.4) and log-mel (0.5) on every split; seed 2 is behind log-mel on average
    _write_run(tmp_path, "base", 1, _probe([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], 1))
    _write_run(tmp_path, "base", 2, _probe([0.45, 0.45, 0.45], [0.4, 0.4, 0.4], 2))
    text, _ = ablation.tabulate(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| set1 | freq |"))
    assert row == "| set1 | freq | 1,2 | +20.0 / +5.0 | +10.0 / -5.0 | no |"
    (tmp_path / "base" / "seed2" / "run.json").unlink()
    text, _ = ablation.tabulate(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| set1 | freq |"))
    assert row == "| set1 | freq | 1 | +20.0 | +10.0 | yes |"


def test_equal_time_scales_updates_by_the_base_cost_measured_beside_the_variant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[tuple[str, ...]] = []

    def seconds_per_update(args, overrides, run_dir, env) -> float:
        timed.append(tuple(overrides))
        return 0.2 if overrides else 0.3  # the variant is cheaper per update than the base

    monkeypatch.setattr(ablation, "_seconds_per_update", seconds_per_update)
    monkeypatch.setattr(ablation, "pretrain", lambda ns, run_dir, env: ("ck.pt", 1.0))
    monkeypatch.setattr(ablation, "_run", lambda cmd, log, env: 1.0)  # the probes
    common = ["run", "--pool", str(tmp_path), "--set", f"a={tmp_path}", "--equal-time"]
    assert ablation.main([*common, "--out", str(tmp_path / "o"), "--max-update", "1000",
                          "--variants", "linear_decoder,frame_only"]) == 0
    record = json.loads((tmp_path / "o" / "linear_decoder" / "seed1" / "run.json").read_text())
    assert record["max_update"] == 1500 and record["equal"] == "wall time"  # 1000 x 0.3 / 0.2
    assert record["seconds_per_update"] == 0.2 and record["base_seconds_per_update"] == 0.3
    assert "model.ema_anneal_end_step=1500" in record["overrides"]
    other = json.loads((tmp_path / "o" / "frame_only" / "seed1" / "run.json").read_text())
    assert other["max_update"] == 1000 and other["equal"] == "updates"  # same cost: equal updates, not timed
    assert sorted(timed) == [(), ("model.decoder_type=linear",)]
    with pytest.raises(SystemExit, match="--equal-time needs --max-update"):
        ablation.main([*common, "--out", str(tmp_path / "p"), "--variants", "mask0.6"])


def test_a_killed_equal_time_run_resumes_with_the_update_count_it_started_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {(): 0.3, ("model.decoder_type=linear",): 0.2}
    monkeypatch.setattr(ablation, "_seconds_per_update", lambda args, overrides, run_dir, env: rates[tuple(overrides)])
    planned: list[int] = []

    def killed(ns, run_dir, env):
        planned.append(ns.max_update)
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(ablation, "pretrain", killed)
    monkeypatch.setattr(ablation, "_run", lambda cmd, log, env: 1.0)
    argv = ["run", "--pool", str(tmp_path), "--set", f"a={tmp_path}", "--equal-time", "--out", str(tmp_path / "o"),
            "--max-update", "1000", "--variants", "linear_decoder"]
    assert ablation.main(argv) == 1 and planned == [1500]
    rates[()] = 0.4  # the machine is busier when the run is started again: a new timing would say 2000
    resumed: list[Any] = []
    monkeypatch.setattr(ablation, "pretrain", lambda ns, run_dir, env: (resumed.append(ns), ("ck.pt", 1.0))[1])
    assert ablation.main(argv) == 0
    assert resumed[0].max_update == 1500 and "model.ema_anneal_end_step=1500" in resumed[0].set
    assert "lr_scheduler.warmup_updates=150" in resumed[0].set
    record = json.loads((tmp_path / "o" / "linear_decoder" / "seed1" / "run.json").read_text())
    assert record["max_update"] == 1500 and record["base_seconds_per_update"] == 0.3


def test_a_resume_with_another_max_update_says_it_keeps_the_planned_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def killed(ns, run_dir, env):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(ablation, "pretrain", killed)
    monkeypatch.setattr(ablation, "_run", lambda cmd, log, env: 1.0)
    argv = ["run", "--pool", str(tmp_path), "--set", f"a={tmp_path}", "--out", str(tmp_path / "o"),
            "--max-update", "1000", "--variants", "frame_only"]
    assert ablation.main(argv) == 1
    resumed: list[Any] = []
    monkeypatch.setattr(ablation, "pretrain", lambda ns, run_dir, env: (resumed.append(ns), ("ck.pt", 1.0))[1])
    capsys.readouterr()
    assert ablation.main([*argv[:-4], "--max-update", "2000", "--variants", "frame_only"]) == 0
    out = capsys.readouterr().out
    assert resumed[0].max_update == 1000
    assert "with the 1000 updates it was planned with" in out
    assert "--max-update 2000 differs from the 1000 it was started with" in out


def test_table_says_when_each_runs_online_probe_passed_log_mel(tmp_path: Path) -> None:
    _write_run(tmp_path, "base", 1, _probe([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], 1))
    record = json.loads((tmp_path / "base" / "seed1" / "run.json").read_text())
    record.update(overrides=["task.probe_interval_updates=100"], max_update=400)
    (tmp_path / "base" / "seed1" / "run.json").write_text(json.dumps(record))
    (tmp_path / "base" / "seed1" / "pretrain").mkdir()
    (tmp_path / "base" / "seed1" / "pretrain" / "hydra_train.log").write_text("".join(
        f"[2026-12-06 10:00:00,000][train_inner][INFO] - epoch 001:  {n} / 9 loss=1.0, num_updates={n}, "
        f"probe_student_logreg={acc}, probe_logmel_logreg=0.5, wall={6 * n}\n"
        for n, acc in [(100, 0.4), (200, 0.55), (300, 0.45), (400, 0.6)]))
    _write_run(tmp_path, "frame_only", 1, _probe([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], 1))  # no online probe
    text, _ = ablation.tabulate(str(tmp_path))
    rows = [line for line in text.splitlines()[text.splitlines().index("### online probe: first update above log-mel"):]
            if line.startswith("| base") or line.startswith("| frame_only")]
    # above 50.0 first at update 200 (55.0, wall 1,200 s = 20 min), below at 300, above for good from 400 (40 min)
    assert rows == ["| base | 1 | 100 | 50.0 | 200 | 20 | 55.0 | 400 | 40 |"]
