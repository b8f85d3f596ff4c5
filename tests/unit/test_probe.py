"""Frozen-feature probe (core + eat-probe) and the pre-training diagnostics it is read with."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.data.features import FeatureConfig
from eat_fairseq.model.objective import teacher_targets
from eat_fairseq.model.pretraining import feature_spread, positional_share
from eat_fairseq.evaluation.probe import (_folds, _pool, ProbeData, SplitSpec, encoder_features, evaluate_features,
                                    evenly_spaced, load_probe_data, logreg_accuracy, parse_splits)


def synthetic_probe(num_groups: int = 3, per_group: int = 60, num_classes: int = 4, dim: int = 16,
                    separation: float = 6.0, seed: int = 0) -> tuple[torch.Tensor, ProbeData]:
    """Gaussian clusters, one per class, spread over ``num_groups`` folds."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * separation
    labels = torch.arange(num_groups * per_group) % num_classes
    x = centres[labels] + torch.randn(len(labels), dim, generator=g)
    data = ProbeData(fbank=[torch.zeros(1, 128)] * len(labels), labels=labels,
                     groups=torch.arange(len(labels)) // per_group,
                     split_names=[f"g{i}" for i in range(num_groups)],
                     spec=SplitSpec(folds=[f"g{i}" for i in range(num_groups)]),
                     num_classes=num_classes, class_names=[str(c) for c in range(num_classes)])
    return x, data


def test_probe_separates_well_separated_classes() -> None:
    x, data = synthetic_probe()
    res = evaluate_features(x, data)
    assert res["logreg"] > 0.97 and res["knn"] > 0.97, res
    assert len(res["logreg_folds"]) == 3


def test_probe_gives_chance_on_shuffled_labels() -> None:
    """Labels unrelated to the features: both classifiers must fall to chance (25% for 4 classes).

    A probe that leaked test labels into fitting or model selection would stay far above it.
    """
    x, data = synthetic_probe(per_group=200)
    perm = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1))
    data.labels = data.labels[perm]
    res = evaluate_features(x, data)
    for name in ("logreg", "knn"):
        assert 0.17 < res[name] < 0.33, (name, res)


def test_l2_strength_chosen_on_every_other_fold() -> None:
    """``l2_folds="others"``: every training fold validates in turn (never the test fold) and the
    strength with the best mean accuracy wins; the default keeps the one next fold."""
    x, data = synthetic_probe(num_groups=4, separation=0.4, seed=20)
    for (train, test, nxt), (train2, test2, others) in zip(_folds(data), _folds(data, "others")):
        assert torch.equal(train, train2) and torch.equal(test, test2) and len(nxt) == 1 and len(others) == 3
        groups = [set(data.groups[train][m].tolist()) for m in others]
        assert sorted(map(len, groups)) == [1, 1, 1] and set.union(*groups) == set(data.groups[train].tolist())
    train, test, masks = _folds(data, "others")[0]
    grid = (1e-3, 1.0, 30.0)
    y, n = data.labels, data.num_classes
    per_mask = {l2: [logreg_accuracy(x[train][~m], y[train][~m], x[train][m], y[train][m], n, [], (l2,))[0]
                     for m in masks] for l2 in grid}
    order = sorted(grid, reverse=True)
    best = max(order, key=lambda l2: np.mean(per_mask[l2]))
    # chosen so that no single fold's best is the mean's: a choice on one fold could not pass
    assert all(max(order, key=lambda l2: per_mask[l2][i]) != best for i in range(len(masks)))
    assert logreg_accuracy(x[train], y[train], x[test], y[test], n, masks, grid)[1] == best
    assert evaluate_features(x, data, l2_folds="others")["logreg"] > 0.3
    with pytest.raises(ValueError, match="l2_folds"):
        _folds(data, "all")


def test_train_test_spec_and_subset() -> None:
    x, data = synthetic_probe(num_groups=2)
    data.spec = SplitSpec(train="g0", test="g1")
    res = evaluate_features(x, data)
    assert len(res["logreg_folds"]) == 1 and res["logreg"] > 0.97
    assert evenly_spaced(10, 3) == [0, 4, 9] and evenly_spaced(3, 10) == [0, 1, 2]
    sub = data.subset(8)
    assert len(sub) == 16 and set(sub.labels.tolist()) == {0, 1, 2, 3}  # every class, not the first rows


def test_positional_share_and_spread() -> None:
    g = torch.Generator().manual_seed(0)
    position_only = torch.randn(1, 32, 16, generator=g).expand(8, 32, 16).contiguous()
    content = torch.randn(8, 32, 16, generator=g)
    assert positional_share(position_only) > 0.99
    assert positional_share(content) < 0.05  # finite-batch bias removed
    mixed = position_only + content
    assert 0.3 < float(positional_share(mixed)) < 0.7
    assert feature_spread(torch.ones(5, 8) * 3.0) == 0.0
    assert feature_spread(torch.randn(64, 8, generator=g)) > 0.8


def test_target_position_center_removes_the_positional_part() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 32, 16, generator=g)
    ffn = [pos + 0.3 * torch.randn(6, 1 + 32, 16, generator=g) for _ in range(2)]
    keep = teacher_targets(ffn, 2)
    center = teacher_targets(ffn, 2, position="center")
    assert torch.equal(keep, teacher_targets(ffn, 2, position="keep"))
    assert positional_share(keep) > 0.5
    assert positional_share(center) < 0.05
    with pytest.raises(ValueError, match="position"):
        teacher_targets(ffn, 2, position="drop")


def write_tone_folder(root: Path, splits: int = 3, per_class: int = 6, sr: int = 16000) -> Path:
    """Two classes (low / high tone) x ``splits`` splits, with label files and descriptors."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(splits):
        rows, labels = [], []
        for c, base in enumerate((300.0, 2500.0)):
            for k in range(per_class):
                n = int(sr * rng.uniform(0.4, 1.0))
                t = np.arange(n) / sr
                x = 0.3 * np.sin(2 * np.pi * base * rng.uniform(0.9, 1.1) * t) + 0.02 * rng.standard_normal(n)
                name = f"s{s}_c{c}_{k}.wav"
                sf.write(audio / name, x.astype(np.float32), sr)
                rows.append(f"{name}\t{n}")
                labels.append(f"{name[:-4]}\t{'low' if c == 0 else 'high'}")
        (root / f"split{s}.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
        (root / f"split{s}.lbl").write_text("\n".join(labels) + "\n")
    (root / "label_descriptors.csv").write_text("0,low\n1,high\n")
    return root


def test_encoder_features_shapes_and_modes(tmp_path: Path) -> None:
    data = load_probe_data(str(write_tone_folder(tmp_path, splits=2, per_class=2)), "auto")
    assert data.split_names == ["split0", "split1"] and len(data) == 8
    enc = EATEncoder(EncoderConfig.tiny())
    enc.train()
    feats = encoder_features(enc, data, FeatureConfig(target_length=128), layers=[-1, 0])
    assert enc.training  # mode restored
    assert feats[(1, "freq")].shape == (8, 8 * 64) and feats[(0, "cls")].shape == (8, 64)
    # pooling over real patches only: a clip padded further gives the same "mean" on its real part
    longer = encoder_features(enc, data, FeatureConfig(target_length=256), layers=[0], poolings=["mean"],
                              pool_padding=False)
    assert longer[(0, "mean")].shape == (8, 64)
    with pytest.raises(ValueError, match="at least 2"):
        parse_splits("split0", str(tmp_path))


def test_freqstd_pooling_is_time_mean_and_std_over_real_patches() -> None:
    """freqstd = [freq | per-column population std over the real time patches], like logmel-meanstd."""
    torch.manual_seed(0)
    b, h, w, d = 3, 5, 4, 6
    x = torch.randn(b, 1 + h * w, d)
    real = torch.tensor([5, 2, 1])
    out = _pool(x, real, w, "freqstd")
    assert out.shape == (b, 2 * w * d)
    assert torch.equal(out[:, : w * d], _pool(x, real, w, "freq"))
    grid = x[:, 1:].reshape(b, h, w, d)
    for i, n in enumerate(real.tolist()):
        expect = grid[i, :n].std(0, unbiased=False).reshape(-1)
        assert torch.allclose(out[i, w * d :], expect, atol=1e-6)
    assert torch.all(out[2, w * d :] == 0)  # one real patch: no spread


def test_eat_probe_cli(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path / "tones")
    out_json = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "eat_fairseq.cli.probe", "--data", str(folder), "--arch", "tiny", "--random-init",
           "--layers", "last", "--pooling", "mean,freq", "--json", str(out_json), "--target-length", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logmel-meanstd" in proc.stdout and "random-init" in proc.stdout
    result = json.loads(out_json.read_text())
    rows = {(r["model"], r["pooling"]): r for r in result["rows"]}
    assert rows[("logmel", "logmel-mean")]["logreg"] > 0.9  # tones are trivially separable by spectrum
    assert len(rows[("random-init(seed 1)", "freq")]["logreg_folds"]) == 3
    bad = subprocess.run([sys.executable, "-m", "eat_fairseq.cli.probe", "--data", str(tmp_path / "nope"),
                          "--arch", "tiny", "--random-init"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_eat_probe_refuses_threads_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    """The console scripts' one --threads option (cli.common): a bad value stops before any work."""
    from eat_fairseq.cli.probe import main

    with pytest.raises(SystemExit) as info:
        main(["--data", "nowhere", "--arch", "tiny", "--random-init", "--threads", "0"])
    assert info.value.code == 2 and "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_online_probe_only_observes(tmp_path: Path) -> None:
    """OnlineProbe.run leaves every random number generator, the encoders' modes and their weights as
    it found them (fairseq also reseeds torch every update; numpy and Python RNGs it does not)."""
    import random

    from eat_fairseq.evaluation.probe import OnlineProbe

    folder = write_tone_folder(tmp_path, splits=2, per_class=3)
    torch.manual_seed(0)
    student, teacher = EATEncoder(EncoderConfig.tiny()).train(), EATEncoder(EncoderConfig.tiny()).eval()
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    probe = OnlineProbe(str(folder), FeatureConfig(target_length=128), max_per_split=2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    out = probe.run({"student": student, "teacher": teacher})
    assert set(out) == {f"probe_{m}_{c}" for m in ("student", "teacher", "logmel") for c in ("logreg", "knn")}
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert student.training and not teacher.training
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())


def test_online_probe_logs_the_logmel_baseline_of_its_own_clips(tmp_path: Path) -> None:
    """The online probe's log-mel line is eat-probe's baseline on the same clips and folds (the better
    of its two rows per classifier), computed once; ``logmel_baseline=False`` leaves it out."""
    from eat_fairseq.evaluation.probe import OnlineProbe, probe_logmel

    folder = write_tone_folder(tmp_path, splits=2, per_class=3)
    feat = FeatureConfig(target_length=128)
    encoder = EATEncoder(EncoderConfig.tiny()).eval()
    probe = OnlineProbe(str(folder), feat, max_per_split=2)
    out = probe.run({"student": encoder})
    rows = probe_logmel(probe.data, feat)
    assert {r.pooling for r in rows} == {"logmel-mean", "logmel-meanstd"}
    assert out["probe_logmel_logreg"] == max(r.logreg for r in rows)
    assert out["probe_logmel_knn"] == max(r.knn for r in rows)
    probe._baseline = {"probe_logmel_logreg": -1.0, "probe_logmel_knn": -1.0}  # computed once, then reused
    assert probe.run({"student": encoder})["probe_logmel_logreg"] == -1.0
    quiet = OnlineProbe(str(folder), feat, max_per_split=2, logmel_baseline=False)
    assert set(quiet.run({"student": encoder})) == {"probe_student_logreg", "probe_student_knn"}


def test_whole_clips_probes_past_the_window(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Clips longer than the input are reported as cropped; --whole-clips feeds each clip whole (up to
    the encoder's max_length patches), so its features equal the encoder run on the full clip."""
    from eat_fairseq.cli.probe import main

    folder = write_tone_folder(tmp_path / "tones", splits=2, per_class=3)
    common = ["--data", str(folder), "--arch", "tiny", "--random-init", "--layers", "last", "--pooling", "mean"]
    with caplog.at_level("WARNING", logger="eat_fairseq.probe"):
        assert main(common + ["--target-length", "32", "--json", str(tmp_path / "crop.json")]) == 0
    assert "12 of 12 clips are longer than the input of 32 frames" in caplog.text and "--whole-clips" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="eat_fairseq.probe"):
        assert main(common + ["--whole-clips", "--json", str(tmp_path / "whole.json")]) == 0
    assert "cropped" not in caplog.text
    settings = json.loads((tmp_path / "whole.json").read_text())["settings"]
    assert settings["whole_clips"] and settings["natural_length"]
    assert settings["feature_config"]["target_length"] == 16 * EncoderConfig.tiny().max_length
    assert main(common + ["--whole-clips", "--target-length", "64"]) == 2

    data = load_probe_data(str(folder), "auto")
    enc = EATEncoder(EncoderConfig.tiny()).eval()
    feat = FeatureConfig(target_length=16 * 768)
    whole = encoder_features(enc, data, feat, layers=[-1], poolings=["mean"], natural_length=True)[(1, "mean")]
    cropped = encoder_features(enc, data, FeatureConfig(target_length=32), layers=[-1], poolings=["mean"],
                               natural_length=True)[(1, "mean")]
    fb = data.fbank[0]
    frames = -(-fb.shape[0] // 16) * 16
    assert frames > 32
    from eat_fairseq.data.features import pad_or_crop, to_window
    import dataclasses
    x = to_window(pad_or_crop(fb, frames)[None], dataclasses.replace(feat, target_length=frames))
    with torch.no_grad():
        h = enc.extract_features(x)
    expect = h[:, 1:].reshape(1, -1, 8, 64)[:, : -(-fb.shape[0] // 16)].mean((1, 2))
    assert torch.allclose(whole[0], expect[0], atol=1e-5)
    assert not torch.allclose(whole[0], cropped[0], atol=1e-3)
