"""Fine-tuning core: labels, losses, metrics, sampling, augmentation, classifier and layer decay."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eat_fairseq.data import augment
from eat_fairseq.model.classifier import (
    EATClassifier,
    EncoderLoadError,
    layer_decay_param_groups,
    torch_param_groups,
)
from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.model.finetune_losses import bce_per_clip, bce_positive_norm, cross_entropy, finetune_loss
from eat_fairseq.data.labels import LabelError, LabelSet, read_label_descriptors, read_split_labels
from eat_fairseq.evaluation.metrics import (
    accuracy,
    average_precision,
    evaluate_predictions,
    mean_average_precision,
    mean_auc,
    roc_auc,
    write_per_class_ap,
)
from eat_fairseq.data.sampling import WeightedEpochSampler, balanced_weights, read_weights

# --------------------------------------------------------------------------- labels


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_label_descriptors_with_and_without_header(tmp_path):
    with_header = _write(
        tmp_path / "a.csv", 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
    )
    labels = read_label_descriptors(with_header)
    assert labels.labels == ["/m/09x0r", "/m/05zppz"]
    assert labels.display_names == ["Speech", "Male speech, man speaking"]
    plain = read_label_descriptors(_write(tmp_path / "b.csv", "0,dog\n1,cat\n"))
    assert plain.index == {"dog": 0, "cat": 1}
    assert plain.display_names == ["dog", "cat"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0,dog\n0,cat\n", "index 0 repeated"),
        ("0,dog\n1,dog\n", "label 'dog' repeated"),
        ("0,dog\n2,cat\n", "missing [1]"),
        ("0,dog\nx,cat\n", ":2: index 'x'"),
        ("0,\n", ":1: expected"),
    ],
)
def test_label_descriptor_errors(tmp_path, text, fragment):
    path = _write(tmp_path / "labels.csv", text)
    with pytest.raises(LabelError) as err:
        read_label_descriptors(path)
    assert fragment in str(err.value) and "labels.csv" in str(err.value)


@pytest.fixture()
def split(tmp_path):
    labels = LabelSet(labels=["dog", "cat", "bird"], display_names=["Dog", "Cat", "Bird"])
    tsv = _write(tmp_path / "train.tsv", "/data\na/x1.wav\t16000\na/x2.wav\t16000\nx3.flac\t8000\n")
    return labels, tsv


def test_split_labels_ok(tmp_path, split):
    labels, tsv = split
    lbl = _write(tmp_path / "train.lbl", "x1\tdog,cat\na/x2.wav\tbird\nx3\tcat,cat\n")
    assert read_split_labels(lbl, labels, tsv) == [[0, 1], [2], [1]]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("x1\tdog\nx2\tcat\n", "2 label lines but"),
        ("x1\tdog\nx2\tfish\nx3\tcat\n", "train.lbl:2: unknown label 'fish'"),
        ("x1\tdog\nx2\t\nx3\tcat\n", "train.lbl:2: empty label list"),
        ("x1\tdog\nx9\tcat\nx3\tcat\n", "train.lbl:2: clip id 'x9' does not match"),
        ("x1\tdog\nx2 cat\nx3\tcat\n", "train.lbl:2: expected"),
    ],
)
def test_split_label_errors(tmp_path, split, text, fragment):
    labels, tsv = split
    lbl = _write(tmp_path / "train.lbl", text)
    with pytest.raises(LabelError) as err:
        read_split_labels(lbl, labels, tsv)
    assert fragment in str(err.value)


def test_single_label_rejects_two_labels(tmp_path, split):
    labels, tsv = split
    lbl = _write(tmp_path / "train.lbl", "x1\tdog\nx2\tcat,dog\nx3\tcat\n")
    with pytest.raises(LabelError, match="train.lbl:2: 2 labels"):
        read_split_labels(lbl, labels, tsv, multi_label=False)


def test_label_set_from_task_state():
    labels = LabelSet.from_index({"cat": "1", "dog": "0"})
    assert labels.labels == ["dog", "cat"]


# --------------------------------------------------------------------------- losses


def test_bce_positive_norm_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    summed, size = bce_positive_norm(logits, targets)
    # element losses: softplus(-z) for positives, softplus(z) for negatives
    expected = math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e) + math.log(1 + math.exp(-0.5))
    assert summed.item() == pytest.approx(expected, rel=1e-6)
    assert size.item() == 3.0
    assert (summed / size).item() == pytest.approx(expected / 3, rel=1e-6)


def test_bce_positive_norm_denominator_survives_mixup():
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mixed = 0.3 * targets + 0.7 * targets.flip(0)
    _, size = bce_positive_norm(torch.zeros(2, 3), mixed)
    assert size.item() == pytest.approx(3.0)


def test_cross_entropy_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    summed, size = cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)
    logp = F.log_softmax(logits, -1)[0]
    target = torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert summed.item() == pytest.approx(-(target * logp).sum().item(), rel=1e-6)
    assert size.item() == 1.0
    torch_ref = F.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)
    assert summed.item() == pytest.approx(torch_ref.item(), rel=1e-6)
    soft = torch.tensor([[0.25, 0.75, 0.0]])
    summed_soft, _ = cross_entropy(logits, soft, label_smoothing=0.0)
    assert summed_soft.item() == pytest.approx(-(0.25 * logp[0] + 0.75 * logp[1]).item(), rel=1e-6)


def test_bce_per_clip_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    summed, size = bce_per_clip(logits, torch.tensor([1, 1]))
    expected = 2 * math.log(2) + math.log(1 + math.e) + math.log(1 + math.e)
    assert summed.item() == pytest.approx(expected, rel=1e-6)
    assert size.item() == 2.0
    assert finetune_loss("bce", logits, torch.tensor([1, 1]))[0].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        finetune_loss("focal", logits, torch.tensor([1, 1]))


# --------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_with_ties_and_empty_class():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.2).astype(int)
    y[:, 3] = 0  # a class without positives
    y[:, 5] = 1  # a class without negatives
    scores = rng.random((200, 6))
    scores[:, 1] = np.round(scores[:, 1], 1)  # many ties
    ap = average_precision(y, scores)
    auc = roc_auc(y, scores)
    for c in (0, 1, 2, 4, 5):
        assert ap[c] == pytest.approx(sk.average_precision_score(y[:, c], scores[:, c]), abs=1e-12)
    for c in (0, 1, 2, 4):
        assert auc[c] == pytest.approx(sk.roc_auc_score(y[:, c], scores[:, c]), abs=1e-12)
    assert math.isnan(ap[3]) and math.isnan(auc[3]) and math.isnan(auc[5])
    expected_map = np.mean([sk.average_precision_score(y[:, c], scores[:, c]) for c in (0, 1, 2, 4, 5)])
    assert mean_average_precision(y, scores) == pytest.approx(expected_map, abs=1e-12)
    assert mean_auc(y, scores) == pytest.approx(
        np.mean([sk.roc_auc_score(y[:, c], scores[:, c]) for c in (0, 1, 2, 4)]), abs=1e-12
    )


def test_accuracy_and_report(tmp_path):
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.0, 0.1, 0.9]])
    targets = np.array([0, 1, 2, 2])
    assert accuracy(targets, scores) == 0.75
    report = evaluate_predictions(targets, scores)
    assert report.accuracy == 0.75
    assert isinstance(report.mAP, float) and isinstance(report.auc, float)
    out = tmp_path / "ap.tsv"
    write_per_class_ap(out, report, ["a", "b", "c"], ["A", "B", "C"])
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["index", "label", "display_name", "positives", "ap", "auc"]
    assert lines[3].split("\t")[:4] == ["2", "c", "C", "2"]
    assert float(lines[1].split("\t")[4]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- sampling


def test_balanced_weights_formula():
    weights = balanced_weights([[0], [0, 1], [1, 2], [0]], num_classes=3)
    c0, c1, c2 = 1000 / 3.01, 1000 / 2.01, 1000 / 1.01
    np.testing.assert_allclose(weights, [c0, c0 + c1, c1 + c2, c0])


def test_weighted_sampler_without_replacement_and_seeded():
    weights = np.array([100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    sampler = WeightedEpochSampler(weights, num_samples=3, seed=7)
    first = sampler.indices(1)
    assert len(set(first.tolist())) == 3 and 7 not in first
    np.testing.assert_array_equal(first, sampler.indices(1))
    draws = np.stack([sampler.indices(epoch) for epoch in range(1, 401)])
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])
    # index 0 (weight 100 of 106) is almost always drawn; index 7 (weight 0) never
    assert (draws == 0).any(axis=1).mean() > 0.99
    assert not (draws == 7).any()
    # the light clips share the other draws evenly
    light = np.array([(draws == i).sum() for i in range(1, 7)])
    assert light.min() > 0.6 * light.mean()
    with pytest.raises(ValueError):
        WeightedEpochSampler(weights, num_samples=8)


def test_read_weights(tmp_path):
    path = _write(tmp_path / "train.weights", "1.5\n2\n")
    np.testing.assert_allclose(read_weights(path, expected_rows=2), [1.5, 2.0])
    with pytest.raises(ValueError, match="3 rows"):
        read_weights(path, expected_rows=3)


# --------------------------------------------------------------------------- augmentation


def test_mixup_uses_one_lambda_and_flipped_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 128)
    y = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    mx, my, lam = augment.mixup(x, y, alpha=0.8, prob=1.0, generator=g)
    assert 0 < lam < 1 and mx.shape == x.shape and my.shape == y.shape
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(my.sum(1), torch.ones(4))
    same = augment.mixup(x, y, prob=0.0, generator=g)
    assert same[2] == 1.0 and same[0] is x
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert augment.mixup(x, y, prob=1.0, generator=g1)[2] == augment.mixup(x, y, prob=1.0, generator=g2)[2]


def test_spec_augment_one_band_each():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(16, 1, 64, 128)
    out = augment.spec_augment(x, freq_ratio=0.2, time_ratio=0.2, generator=g)
    assert out.shape == x.shape
    for row in out[:, 0]:
        zero_bins = (row == 0).all(dim=0).sum().item()  # frequency columns zero at every frame
        zero_frames = (row == 0).all(dim=1).sum().item()
        assert zero_bins < 128 * 0.2 and zero_frames < 64 * 0.2
        freq_cols = torch.nonzero((row == 0).all(dim=0)).flatten()
        if len(freq_cols) > 1:
            assert (freq_cols.diff() == 1).all()  # one contiguous band
    assert (out == 0).any()
    assert augment.spec_augment(x, 0.0, 0.0, generator=g).equal(x)


def test_roll_and_gain():
    g = torch.Generator().manual_seed(2)
    wave = torch.randn(3, 1000)
    out = augment.roll_and_gain(wave, generator=g)
    for i in range(3):
        gain = out[i].norm() / wave[i].norm()
        assert 0.5 < gain < 1.5
        # a roll keeps the multiset of samples
        torch.testing.assert_close(torch.sort(out[i] / gain).values, torch.sort(wave[i]).values, rtol=1e-4, atol=1e-5)


def _time_shifts_explaining(out: torch.Tensor, clean: torch.Tensor, max_shift: int = 12) -> list[int]:
    """Shifts s with ``out - roll(clean, s, time) in [0, 0.1)`` everywhere (``out``/``clean``: (T, F))."""
    return [
        s
        for s in range(-max_shift, max_shift + 1)
        if bool(((d := out - torch.roll(clean, s, dims=0)) >= 0).all() and (d < 0.1).all())
    ]


def test_noise_and_roll_rolls_a_structured_input():
    """fbank noise + time roll on a ramp (every value distinct, neighbours 1 apart, so noise < 0.1
    cannot hide a roll): the output is exactly one time-roll of the input plus noise in [0, 0.1).

    The reference's ``randint(-10, 10)`` is numpy's (the release augments with ``np.random.randint``),
    whose high end is exclusive; the implementation uses ``torch.randint(-max_roll, max_roll)``, also
    exclusive: shifts lie in [-10, 9], +10 is never drawn."""
    T, F, B = 48, 16, 200
    ramp = torch.arange(T * F, dtype=torch.float64).reshape(T, F)  # float64: (x + n) - x recovers n
    clean = ramp.expand(B, 1, T, F).clone()
    out = augment.noise_and_roll(clean, max_roll=10, generator=torch.Generator().manual_seed(3))
    assert out.shape == clean.shape and out.dtype == torch.float64
    torch.testing.assert_close(clean[:, 0], ramp.expand(B, T, F))  # input untouched
    shifts, peak_noise = [], []
    for i in range(B):
        found = _time_shifts_explaining(out[i, 0], ramp)
        assert len(found) == 1, (i, found)  # a roll along time (frequency rolls/flips match nothing)
        shifts.append(found[0])
        noise = out[i, 0] - torch.roll(ramp, found[0], dims=0)
        assert float(noise.min()) >= 0.0 and float(noise.max()) < 0.1
        peak_noise.append(float(noise.max()))
    assert min(shifts) == -10 and max(shifts) == 9, sorted(set(shifts))
    assert set(shifts) == set(range(-10, 10))  # 200 draws of 20 values: every shift shows up
    # noise is U(0,1) * u / 10 with one u per clip: the per-clip peak (~u / 10) varies between clips
    assert max(peak_noise) > 0.08 and min(peak_noise) < 0.02

    # (T, F) and (B, T, F) inputs: rolled along their time axis (-2) too, max_roll honoured
    single = augment.noise_and_roll(ramp, max_roll=3, generator=torch.Generator().manual_seed(4))
    assert single.shape == (T, F)
    found = _time_shifts_explaining(single, ramp)
    assert len(found) == 1 and -3 <= found[0] <= 2
    batch = augment.noise_and_roll(ramp.expand(4, T, F), max_roll=2, generator=torch.Generator().manual_seed(5))
    for i in range(4):
        found = _time_shifts_explaining(batch[i], ramp)
        assert len(found) == 1 and -2 <= found[0] <= 1

    # float32 features (what the dataset passes): same bounds up to float32 rounding of x + n
    feats = ramp.float()[None]
    noisy = augment.noise_and_roll(feats, generator=torch.Generator().manual_seed(6))[0]
    explained = []
    for k in range(-12, 13):
        d = noisy - torch.roll(feats[0], k, dims=0)
        if float(d.min()) >= -1e-4 and float(d.max()) < 0.1 + 1e-4:
            explained.append(k)
    assert len(explained) == 1 and -10 <= explained[0] <= 9


# --------------------------------------------------------------------------- classifier


def _tiny() -> EncoderConfig:
    return EncoderConfig.tiny(max_length=8)


def test_classifier_shapes_and_pooling():
    torch.manual_seed(0)
    for pooling in ("cls", "mean"):
        model = EATClassifier(_tiny(), num_classes=5, pooling=pooling).eval()
        logits = model(torch.randn(2, 1, 128, 128))
        assert logits.shape == (2, 5)
    assert float(model.head.bias.detach().abs().sum()) == 0.0
    assert model.fc_norm.eps == 1e-6
    with pytest.raises(ValueError):
        EATClassifier(_tiny(), 5, pooling="max")


def test_freeze_encoder():
    model = EATClassifier(_tiny(), 3, freeze_encoder=True).train()
    assert not model.encoder.training and model.head.training
    groups = layer_decay_param_groups(model)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_load_encoder_from_pretraining():
    torch.manual_seed(0)
    source = EATEncoder(_tiny())
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state.update({f"teacher.{k}": torch.zeros_like(v) for k, v in source.state_dict().items()})
    state["decoder.proj.weight"] = torch.zeros(3, 3)
    model = EATClassifier(_tiny(), 4)
    model.load_encoder_from_pretraining(state)
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    model.load_encoder_from_pretraining(state, prefix="teacher.")
    assert float(model.encoder.blocks[0].attn.qkv.weight.detach().abs().sum()) == 0.0
    broken = dict(state)
    del broken["encoder.pre_norm.weight"]
    broken["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(EncoderLoadError) as err:
        model.load_encoder_from_pretraining(broken)
    assert "pre_norm.weight" in str(err.value) and "extra.weight" in str(err.value)
    with pytest.raises(EncoderLoadError, match="shape"):
        EATClassifier(EncoderConfig.tiny(max_length=16), 4).load_encoder_from_pretraining(state)


def test_layer_decay_groups_follow_reference():
    model = EATClassifier(_tiny(), 4)
    groups = layer_decay_param_groups(model, base_lr=1e-3, layer_decay=0.65, weight_decay=0.05)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    n_blocks = 2
    for name, _ in model.named_parameters():
        if name.startswith("encoder.blocks."):
            j = int(name.split(".")[2])
            assert scale_of[name] == pytest.approx(0.65 ** (n_blocks - j))
        else:
            assert scale_of[name] == 1.0, name
    assert scale_of["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.65**2)
    assert scale_of["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.65)
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
        assert group["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(torch_param_groups(groups), lr=1e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.65**2 * 1e-3, 0.65 * 1e-3, 1e-3])
    no_1d = layer_decay_param_groups(model, no_weight_decay_1d=True)
    decay_of = {n: g["weight_decay"] for g in no_1d for n in g["names"]}
    assert decay_of["head.bias"] == 0.0 and decay_of["encoder.cls_token"] == 0.0 and decay_of["head.weight"] == 0.05


def test_audioset_file_namings_match_ids(tmp_path):
    labels = LabelSet(labels=["/m/a"], display_names=["a"])
    tsv = _write(tmp_path / "t.tsv", "/d\nsub/--PJHxphWEs_30.000.wav\t10\nY-abc.flac\t10\n")
    lbl = _write(tmp_path / "t.lbl", "--PJHxphWEs\t/m/a\n-abc\t/m/a\n")
    assert read_split_labels(lbl, labels, tsv) == [[0], [0]]
