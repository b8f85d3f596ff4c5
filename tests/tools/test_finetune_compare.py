"""experiments/finetune_compare.py: fold plan, fold data, fair overrides, and an end-to-end run of both arms."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fairseq")

from helpers import REPO, hydra_train_cmd, make_audio_corpus, run  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
import finetune_compare as fc  # noqa: E402

from eat_fairseq.checkpoints.load import load_checkpoint  # noqa: E402
from eat_fairseq.checkpoints.convert import build_checkpoint  # noqa: E402
from eat_fairseq.model.encoder import EncoderConfig  # noqa: E402
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig  # noqa: E402

SCRIPT = REPO / "experiments" / "finetune_compare.py"
CONFIGS_PRE = REPO / "examples" / "pretraining"
SPEAKERS = ("carl", "anna", "bob")  # not sorted on purpose
# feature settings unlike the recipe's (128 frames, AudioSet statistics): the runs must take the checkpoint's
FEATURES = {"target_length": 64, "norm_mean": -5.5, "norm_std": 4.0}


def write_speakers(root: Path, speakers=SPEAKERS, per_class: int = 4) -> Path:
    """One labelled split per speaker: two tone classes (low / high), 0.5 s clips at 8 kHz."""
    rng = np.random.default_rng(0)
    audio, dest = root / "audio", root / "speakers"
    audio.mkdir(parents=True)
    dest.mkdir()
    (dest / "label_descriptors.csv").write_text("0,0,low\n1,1,high\n")
    for s in speakers:
        tsv, lbl = [str(audio)], []
        for c, f0 in enumerate((300.0, 1500.0)):
            for i in range(per_class):
                t = np.arange(4000) / 8000
                x = 0.3 * np.sin(2 * np.pi * f0 * rng.uniform(0.9, 1.1) * t) + 0.02 * rng.standard_normal(t.size)
                name = f"{s}_{c}_{i}"
                sf.write(audio / f"{name}.wav", x.astype(np.float32), 8000)
                tsv.append(f"{name}.wav\t{t.size}")
                lbl.append(f"{name}\t{c}")
        (dest / f"{s}.tsv").write_text("\n".join(tsv) + "\n")
        (dest / f"{s}.lbl").write_text("\n".join(lbl) + "\n")
    return dest


def write_pretrained(path: Path) -> Path:
    """A tiny pre-training checkpoint in our layout, with non-default feature settings."""
    torch.manual_seed(0)
    cfg = PretrainConfig.tiny()
    torch.save(build_checkpoint("pretrained", EATPretrainingModel(cfg).state_dict(), cfg, task_overrides=FEATURES), path)
    return path


def test_fold_plan_rotates_deterministically() -> None:
    names = ["theo", "george", "lucas", "jackson", "yweweler", "nicolas"]
    plan = fc.fold_plan(names, 6)
    ordered = sorted(names)
    assert [f["test"] for f in plan] == ordered  # every speaker is held out once
    for k, fold in enumerate(plan):
        assert fold["valid"] == ordered[(k + 1) % 6] and fold["valid"] != fold["test"]
        assert sorted(fold["train"] + [fold["test"], fold["valid"]]) == ordered
    assert fc.fold_plan(list(reversed(names)), 3) == plan[:3]
    for bad in (0, 7):
        with pytest.raises(fc.CompareError, match="--folds"):
            fc.fold_plan(names, bad)
    with pytest.raises(fc.CompareError, match="at least 3"):
        fc.fold_plan(["a", "b"], 1)


def test_fold_data_concatenates_train_and_links_the_rest(tmp_path: Path) -> None:
    speakers = write_speakers(tmp_path, speakers=("anna", "bob", "carl", "dora"), per_class=2)
    fold = fc.fold_plan(fc.speaker_splits(str(speakers)), 1)[0]
    assert (fold["test"], fold["valid"], fold["train"]) == ("anna", "bob", ["carl", "dora"])
    dest = Path(fc.write_fold_data(str(speakers), fold, str(tmp_path / "fold0")))
    lines = (dest / "train.tsv").read_text().splitlines()
    root, rows = lines[0], [r.split("\t") for r in lines[1:]]
    assert [Path(root, r[0]) for r in rows] == [tmp_path / "audio" / f"{s}_{c}_{i}.wav"
                                                for s in ("carl", "dora") for c in (0, 1) for i in (0, 1)]
    assert all(r[1] == "4000" for r in rows)
    ids = [line.split("\t")[0] for line in (dest / "train.lbl").read_text().splitlines()]
    assert ids == [Path(r[0]).stem for r in rows]
    for split, speaker in (("valid", "bob"), ("test", "anna")):
        for ext in ("tsv", "lbl"):
            assert (dest / f"{split}.{ext}").resolve() == (speakers / f"{speaker}.{ext}").resolve()
    assert (dest / "label_descriptors.csv").resolve() == (speakers / "label_descriptors.csv").resolve()
    assert not list(dest.glob("*.wav"))  # no audio copied


def test_fold_data_keeps_the_range_of_span_rows(tmp_path: Path) -> None:
    """A window of a file (span row) stays that window in the concatenated train manifest."""
    from eat_fairseq.data.manifest import read_manifest

    speakers = write_speakers(tmp_path, speakers=("anna", "bob", "carl"), per_class=1)
    tsv = speakers / "carl.tsv"
    lines = tsv.read_text().splitlines()
    first = lines[1].split("\t")[0]
    tsv.write_text("\n".join([lines[0], f"{first}:1000:2000\t2000", *lines[2:]]) + "\n")
    fold = fc.fold_plan(fc.speaker_splits(str(speakers)), 1)[0]
    dest = Path(fc.write_fold_data(str(speakers), fold, str(tmp_path / "fold0")))
    _, rows = read_manifest(str(dest / "train.tsv"))
    span = next(r for r in rows if r.kind == "span")
    assert (span.offset, span.length, span.num_samples) == (1000, 2000, 2000)
    assert span.path == str(tmp_path / "audio" / first)


def test_settings_come_from_the_checkpoint_and_set_cannot_change_them(tmp_path: Path) -> None:
    settings = fc.pretrained_settings(str(write_pretrained(tmp_path / "pre.pt")))
    tiny = EncoderConfig.tiny()
    assert settings["arch"]["embed_dim"] == tiny.embed_dim and settings["arch"]["depth"] == tiny.depth
    assert settings["arch"]["num_heads"] == tiny.num_heads and "drop_path_rate" not in settings["arch"]
    assert {k: settings["features"][k] for k in FEATURES} == FEATURES
    shared = fc.shared_overrides(settings, 100, ["model.layer_decay=0.75"])
    assert "++task.target_length=64" in shared and "++task.norm_mean=-5.5" in shared
    assert "++model.embed_dim=64" in shared and "optimization.max_update=100" in shared
    assert "++lr_scheduler.warmup_updates=10" in shared and shared[-1] == "model.layer_decay=0.75"
    assert "++lr_scheduler.warmup_updates=10" not in fc.shared_overrides(settings, 100, ["lr_scheduler.warmup_updates=5"])
    for bad in ("model.model_path=x", "task.norm_mean=0", "+model.depth=3", "optimization.max_update=9", "nokey"):
        with pytest.raises(fc.CompareError, match="--set"):
            fc.shared_overrides(settings, 100, [bad])


def test_refuses_a_fine_tuned_checkpoint(tmp_path: Path) -> None:
    enc = EncoderConfig.tiny()
    from eat_fairseq.model.classifier import EATClassifier

    path = tmp_path / "ft.pt"
    torch.save(build_checkpoint("finetuned", EATClassifier(enc, 2).state_dict(), PretrainConfig(encoder=enc), 2,
                                {"low": 0, "high": 1}), path)
    with pytest.raises(fc.CompareError, match="pre-training checkpoint"):
        fc.pretrained_settings(str(path))


def _cfg_without_run_paths(path: Path) -> tuple[dict, str]:
    cfg = json.loads(json.dumps(load_checkpoint(path)["cfg"], default=str))
    model_path = cfg["model"].pop("model_path")
    cfg["checkpoint"].pop("save_dir")  # and the paths inside it:
    cfg["common"].pop("tensorboard_logdir")
    cfg["task"].pop("per_class_ap_dir")
    cfg.pop("job_logging_cfg", None)  # names the run's own log file
    return cfg, model_path


def test_end_to_end_both_arms_identical_settings(tmp_path: Path) -> None:
    speakers = write_speakers(tmp_path)
    pre = write_pretrained(tmp_path / "pre.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--checkpoint", str(pre), "--speakers-dir", str(speakers), "--out", str(out),
           "--folds", "1", "--max-update", "2", "--threads", "1", "--jobs", "2", "--keep-checkpoints",
           "--set", "dataset.batch_size=8"]
    log = run(cmd, cwd=tmp_path)
    assert "pretrained better on" in log
    result = json.loads((out / "results.json").read_text())
    fold = result["folds"][0]
    assert (fold["test"], fold["valid"], fold["train"]) == ("anna", "bob", ["carl"])
    assert sorted(r["arm"] for r in fold["runs"]) == ["pretrained", "scratch"]
    for r in fold["runs"]:
        assert r["test_clips"] == 8 and 0.0 <= r["test_accuracy"] <= 1.0 and r["train_seconds"] > 0
    assert fold["difference"] == pytest.approx(fold["pretrained"] - fold["scratch"])
    assert set(result["summary"]) >= {"pretrained", "scratch", "difference"}

    runs = out / "fold0" / "seed1"
    cfg_pre, path_pre = _cfg_without_run_paths(runs / "pretrained" / "checkpoints" / "checkpoint_best.pt")
    cfg_scr, path_scr = _cfg_without_run_paths(runs / "scratch" / "checkpoints" / "checkpoint_best.pt")
    assert path_pre == str(pre) and path_scr is None
    assert cfg_pre == cfg_scr  # identical settings apart from the initialisation
    assert {k: cfg_pre["task"][k] for k in FEATURES} == FEATURES
    assert cfg_pre["model"]["embed_dim"] == EncoderConfig.tiny().embed_dim and cfg_pre["dataset"]["batch_size"] == 8
    assert cfg_pre["optimization"]["max_update"] == 2
    assert "encoder initialised from" in (runs / "pretrained" / "train.log").read_text()
    assert "encoder initialised from" not in (runs / "scratch" / "train.log").read_text()

    # the same command again reuses both finished runs
    again = run(cmd, cwd=tmp_path)
    assert again.count("reusing") == 2 and "fine-tuning (" not in again
    assert json.loads((out / "results.json").read_text())["summary"] == result["summary"]


def test_jobs_run_at_once_and_results_land_in_their_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 2 really runs two fine-tunings at once, and every result lands in its own fold, as serially."""
    speakers = write_speakers(tmp_path, speakers=("anna", "bob", "carl", "dora"), per_class=1)
    pre = write_pretrained(tmp_path / "pre.pt")
    barrier = threading.Barrier(2, timeout=20)

    def fake_run_arm(arm, args, data_dir, run_dir, shared, seed, env):
        if args.jobs == 2:
            barrier.wait()  # times out (BrokenBarrierError) unless a second run is in flight at the same time
        test = Path(data_dir, "test.tsv").resolve().stem
        return {"arm": arm, "seed": seed, "run_dir": run_dir,
                "test_accuracy": (len(test) + seed + (arm == "pretrained")) / 10}

    monkeypatch.setattr(fc, "run_arm", fake_run_arm)
    results = {}
    for jobs in (1, 2):
        args = fc.build_parser().parse_args(["--checkpoint", str(pre), "--speakers-dir", str(speakers), "--out",
                                             str(tmp_path / f"out{jobs}"), "--folds", "3", "--seeds", "1,2",
                                             "--jobs", str(jobs)])
        results[jobs] = fc.run(args)
    for jobs, result in results.items():
        assert result["jobs"] == jobs and [f["test"] for f in result["folds"]] == ["anna", "bob", "carl"]
        for fold in result["folds"]:
            assert [(r["seed"], r["arm"]) for r in fold["runs"]] == [(s, a) for s in (1, 2) for a in fc.ARMS]
            assert all(Path(r["run_dir"]).parent.parent.name == f"fold{fold['fold']}" for r in fold["runs"])
            assert fold["difference"] == pytest.approx(0.1)
    assert results[1]["summary"] == results[2]["summary"]
    summary = results[2]["summary"]
    assert summary["runs_pretrained_better"] == summary["runs_compared"] == 6 and summary["folds_pretrained_better"] == 3
    assert summary["difference"]["sem"] == pytest.approx(0.0, abs=1e-12)
    assert "3 of 3 folds (6 of 6 fold-seed pairs); mean difference +10.0, standard error 0.0" in results[2]["table"]
    with pytest.raises(fc.CompareError, match="--jobs"):
        fc.run(fc.build_parser().parse_args(["--checkpoint", str(pre), "--speakers-dir", str(speakers), "--out",
                                             str(tmp_path / "bad"), "--jobs", "0"]))


def test_valid_curve_and_how_much_sooner(tmp_path: Path) -> None:
    """The valid accuracy of both arms part-way through fine-tuning, read from fairseq's log lines."""
    def log(path: Path, accs: list[float]) -> str:
        lines = ["[2026-11-29 05:32:34,007][train][INFO] - epoch 001 | loss 2.3 | num_updates 10"]
        for epoch, acc in enumerate(accs, 1):
            lines.append(f"[2026-11-29 05:32:34,007][valid][INFO] - epoch {epoch:03d} | valid on 'valid' subset | "
                         f"accuracy {acc} | mAP 0.38 | loss 2.1 | n_eval 500 | num_updates {25 * epoch}"
                         + (f" | best_accuracy {max(accs[:epoch])}" if epoch > 1 else ""))
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    curve = fc.valid_curve(log(tmp_path / "a.log", [0.1, 0.5, 0.4, 0.9]))
    assert curve == [[25, 0.1], [50, 0.5], [75, 0.4], [100, 0.9]]
    assert fc.best_valid_accuracy(str(tmp_path / "a.log")) == 0.9
    runs = [{"arm": "pretrained", "seed": 1, "valid_curve": curve},
            {"arm": "scratch", "seed": 1, "valid_curve": fc.valid_curve(log(tmp_path / "b.log", [0.1, 0.2, 0.4, 0.8]))}]
    points = fc.curve_summary([{"runs": runs}, {"runs": runs}], 100, fractions=(0.1, 0.5, 0.7, 1.0))
    # 0.1 x 100 = 10 updates: no validation yet, left out; 0.7 -> the validation at 50 again, shown once
    assert [p["update"] for p in points] == [50, 100]
    assert points[0]["difference"] == pytest.approx(0.3) and points[0]["folds_pretrained_ahead"] == 2
    assert points[-1]["pretrained"] == pytest.approx(0.9) and points[-1]["scratch"] == pytest.approx(0.8)
    assert "+30.0 +-  0.0   2 of 2" in fc.format_curve(points, 2)


@pytest.mark.slow
def test_with_a_fairseq_pretrained_tiny_checkpoint(tmp_path: Path) -> None:
    """The eat_tiny recipe trained for a few updates by fairseq-hydra-train, then both arms."""
    pool = make_audio_corpus(tmp_path / "pool", num_clips=8)
    run(hydra_train_cmd(CONFIGS_PRE, "eat_tiny", [f"task.data={pool}", f"checkpoint.save_dir={tmp_path / 'pre'}",
                                                  "optimization.max_update=3", "dataset.batch_size=4"]), cwd=tmp_path)
    speakers = write_speakers(tmp_path / "labelled")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "pre" / "checkpoint_last.pt"),
                           "--speakers-dir", str(speakers), "--out", str(out), "--folds", "2", "--max-update", "2",
                           "--seeds", "1,2", "--threads", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert [f["test"] for f in result["folds"]] == ["anna", "bob"]
    assert all(len(f["runs"]) == 4 for f in result["folds"])  # 2 seeds x 2 arms
    assert result["pretrained"]["features"]["target_length"] == 128
    assert not list(out.rglob("*.pt"))  # checkpoints removed after evaluation by default
