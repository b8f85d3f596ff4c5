"""The fairseq datasets on real FSDD recordings (8 kHz speech): features, resampling, labels.

Skipped when the shared FSDD copy (``../shared/data/fsdd/recordings``) is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fairseq")

from eat_fairseq.data.audio import load_audio, to_mono_16k  # noqa: E402
from eat_fairseq.data.features import FeatureConfig, num_frames, waveform_to_features  # noqa: E402
from eat_fairseq.data.labels import read_label_descriptors, read_split_labels  # noqa: E402
from eat_fairseq.fairseq_ext.datasets import EATLabelledDataset  # noqa: E402
from eat_fairseq.fairseq_ext.datasets import EATAudioDataset  # noqa: E402
from eat_fairseq.prep.fsdd import write_fsdd_manifests  # noqa: E402

FSDD_RECORDINGS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd" / "recordings"

pytestmark = pytest.mark.skipif(not FSDD_RECORDINGS.is_dir(), reason="shared FSDD recordings not present")

# the normalisation examples/fsdd uses (FSDD's own statistics)
FEATURES = FeatureConfig(target_length=128, norm_mean=-8.72, norm_std=4.61)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fsdd_manifests")
    write_fsdd_manifests(FSDD_RECORDINGS, dest, workers=1)
    return dest


def _digit(path: str) -> int:
    return int(Path(path).name.split("_")[0])


def _take(path: str) -> int:
    return int(Path(path).stem.split("_")[2])


def _sample_indices(n: int, k: int = 8) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})


def test_test_split_features(manifests: Path) -> None:
    ds = EATAudioDataset(str(manifests / "test.tsv"), features=FEATURES, shuffle=False)
    assert len(ds) == 300  # takes 0-4 x 10 digits x 6 speakers
    assert all(_take(r.path) < 5 for r in ds.rows)
    for i in _sample_indices(len(ds)):
        item = ds[i]
        assert item["id"] == i
        source = item["source"]
        assert source.shape == (1, 128, 128)
        assert source.dtype == torch.float32
        assert torch.isfinite(source).all()

    # one clip by hand: 8 kHz on disk, resampled to 16 kHz before the fbank
    i = _sample_indices(len(ds))[3]
    row = ds.rows[i]
    assert sf.info(row.path).samplerate == 8000
    wave, sr = load_audio(row.path)
    assert sr == 8000 and wave.shape[-1] == row.num_samples
    expected = waveform_to_features(to_mono_16k(wave, sr), 16000, FEATURES)
    torch.testing.assert_close(ds[i]["source"][0], expected)
    # the frame count is that of the 16 kHz waveform: real frames, then the zero padding (normalised)
    frames = num_frames(2 * row.num_samples)
    assert 0 < frames < 128
    pad_value = (0.0 - FEATURES.norm_mean) / (2 * FEATURES.norm_std)
    source = ds[i]["source"][0]
    torch.testing.assert_close(source[frames:], torch.full_like(source[frames:], pad_value))
    assert not torch.allclose(source[frames - 1], torch.full_like(source[frames - 1], pad_value))


def test_test_split_labels(manifests: Path) -> None:
    label_set = read_label_descriptors(manifests / "label_descriptors.csv")
    assert label_set.labels == [str(d) for d in range(10)]
    manifest = manifests / "test.tsv"
    labels = read_split_labels(manifests / "test.lbl", label_set, tsv_path=manifest, multi_label=False)
    ds = EATLabelledDataset(str(manifest), labels=labels, num_classes=10, multi_label=False,
                            features=FEATURES, shuffle=False)
    assert len(ds) == 300
    # every row's class index is the digit in its file name (label "d" is class d)
    assert [ds.labels[i][0] for i in range(len(ds))] == [_digit(r.path) for r in ds.rows]
    picks = _sample_indices(len(ds))
    samples = [ds[i] for i in picks]
    batch = ds.collater(samples)
    assert batch["net_input"]["source"].shape == (len(picks), 1, 128, 128)
    assert torch.isfinite(batch["net_input"]["source"]).all()
    assert batch["target"].dtype == torch.long
    assert batch["target"].tolist() == [_digit(ds.rows[i].path) for i in picks]
    assert len(set(batch["target"].tolist())) > 1  # the picks span several digits
