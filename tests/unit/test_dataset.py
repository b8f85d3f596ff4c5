"""EATAudioDataset: manifests in, normalised fbank out; bad input never passes silently."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fairseq")

from eat_fairseq.data.audio import AudioError, load_audio, to_mono_16k  # noqa: E402
from eat_fairseq.data.features import FeatureConfig, waveform_to_features  # noqa: E402
from eat_fairseq.fairseq_ext.datasets import EATAudioDataset, ManifestError, read_manifest  # noqa: E402
from eat_fairseq.model.masking import MaskSpec  # noqa: E402
from eat_fairseq.model.pretraining import PretrainConfig  # noqa: E402

CFG = FeatureConfig(target_length=128)


def _write(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = (0.1 * rng.standard_normal((n, channels))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x if channels > 1 else x[:, 0], sr)
    return n


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "audio"
    rows = []
    specs = [("a.wav", 1.0, 16000, 1), ("sub/b.flac", 0.7, 8000, 2), ("c.wav", 2.0, 44100, 2), ("d.ogg", 0.5, 22050, 1)]
    for i, (rel, sec, sr, ch) in enumerate(specs):
        rows.append((rel, _write(root / rel, sec, sr, ch, seed=i)))
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{root}\n" + "".join(f"{r}\t{n}\n" for r, n in rows))
    return manifest


def test_items_match_core_features_and_collate(corpus: Path) -> None:
    # whole-file reads: exactly the release's computation on every clip
    ds = EATAudioDataset(str(corpus), CFG, shuffle=False, whole_file=True)
    assert len(ds) == 4
    root, rows = read_manifest(str(corpus))
    for i, row in enumerate(rows):
        item = ds[i]
        wave, sr = load_audio(row.path)
        expected = waveform_to_features(to_mono_16k(wave, sr), 16000, CFG)
        assert item["source"].shape == (1, 128, 128)
        assert torch.equal(item["source"][0], expected)
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["net_input"]["source"].shape == (4, 1, 128, 128)
    assert batch["id"].tolist() == [0, 1, 2, 3]
    assert batch["skipped"] == 0


def test_missing_file_names_file_and_line(corpus: Path) -> None:
    text = corpus.read_text() + "gone.wav\t16000\n"
    corpus.write_text(text)
    ds = EATAudioDataset(str(corpus), CFG, shuffle=False)
    with pytest.raises(AudioError, match=r"gone\.wav.*line 6"):
        ds[4]


def test_skip_mode_drops_and_counts(corpus: Path, tmp_path: Path) -> None:
    root = read_manifest(str(corpus))[0]
    bad = Path(root) / "nan.wav"
    x = np.zeros(16000, dtype=np.float32)
    x[100] = np.nan
    sf.write(bad, x, 16000, subtype="FLOAT")
    corpus.write_text(corpus.read_text() + "nan.wav\t16000\n")
    strict = EATAudioDataset(str(corpus), CFG, shuffle=False)
    with pytest.raises(AudioError, match="nan.wav"):
        strict[4]
    # evaluation order (no replacements): the bad clip is dropped and counted
    lenient = EATAudioDataset(str(corpus), CFG, shuffle=False, on_error="skip")
    batch = lenient.collater([lenient[i] for i in range(5)])
    assert batch["net_input"]["source"].shape[0] == 4
    assert batch["skipped"] == 1


def test_min_samples_filters_short_clips(corpus: Path) -> None:
    ds = EATAudioDataset(str(corpus), CFG, min_samples=12000, shuffle=False)
    # a.wav 16000, b.flac 5600, c.wav 88200, d.ogg 11025 samples
    assert len(ds) == 2
    assert ds.num_short_skipped == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "first line"),
        ("/root\nonly_one_field\n", r":2: expected"),
        ("/root\na.wav\tabc\n", r":2: n_samples is not an integer"),
    ],
)
def test_bad_manifest_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "bad.tsv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(manifest))


def test_masks_in_collater_are_seeded_and_exact(corpus: Path) -> None:
    spec = MaskSpec(clone_batch=3, mask_prob=0.8, mask_length=5, mask_prob_adjust=0.07, patch_size=16)
    ds = EATAudioDataset(str(corpus), CFG, mask=spec, shuffle=False)
    samples = [ds[i] for i in range(4)]
    mask = ds.collater(samples)["net_input"]["mask"]
    assert mask.shape == (12, 64) and mask.dtype == torch.bool
    assert (mask.logical_not().sum(1) == int(64 * (1 - 0.8))).all()
    assert torch.equal(mask, ds.collater(samples)["net_input"]["mask"])
    ds.set_epoch(2)
    assert not torch.equal(mask, ds.collater(samples)["net_input"]["mask"])


def test_works_with_worker_processes(corpus: Path) -> None:
    ds = EATAudioDataset(str(corpus), CFG, mask=PretrainConfig.tiny(clone_batch=2).mask_spec(), shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collater)
    batches = list(loader)
    assert [b["net_input"]["source"].shape[0] for b in batches] == [2, 2]
    assert batches[0]["net_input"]["mask"].shape == (4, 64)
    single = ds.collater([ds[0], ds[1]])
    assert torch.equal(batches[0]["net_input"]["source"], single["net_input"]["source"])
    assert torch.equal(batches[0]["net_input"]["mask"], single["net_input"]["mask"])
