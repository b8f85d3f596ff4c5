"""task.on_bad_file=skip never crashes fairseq and never trains on a placeholder; a wrong root and a
missing file are reported as such, naming the manifest (and line)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")

from eat_fairseq.data.audio import AudioError, load_audio  # noqa: E402
from eat_fairseq.data.features import FeatureConfig  # noqa: E402
from eat_fairseq.data.manifest import ManifestError  # noqa: E402
from eat_fairseq.fairseq_ext.datasets import EATAudioDataset, is_placeholder  # noqa: E402
from helpers import REPO, json_logs, make_audio_corpus, run  # noqa: E402

CFG = FeatureConfig(target_length=128)


def _first_frozen_batch(n: int, batch: int, seed: int = 1, epoch: int = 1) -> list[int]:
    """The clips of fairseq's first batch (its dummy batch): our order for the epoch, cut in batches."""
    return np.random.RandomState(seed + epoch).permutation(n)[:batch].tolist()


def _rows(manifest: Path) -> list[str]:
    return [line.split("\t")[0] for line in manifest.read_text().splitlines()[1:]]


def test_missing_file_reads_not_found_with_manifest_line(tmp_path: Path) -> None:
    data = make_audio_corpus(tmp_path, num_clips=3)
    manifest = data / "train.tsv"
    manifest.write_text(manifest.read_text() + "gone.wav\t1000\n")
    ds = EATAudioDataset(str(manifest), CFG, shuffle=False)
    with pytest.raises(AudioError) as info:
        ds[3]
    message = str(info.value)
    assert "not found" in message and "gone.wav" in message and f"manifest {manifest}, line 5" in message
    assert "System error" not in message
    with pytest.raises(AudioError, match="audio file not found"):
        load_audio(tmp_path / "gone.wav")


def test_missing_root_is_an_error_at_load_naming_the_manifest(tmp_path: Path) -> None:
    data = make_audio_corpus(tmp_path, num_clips=3)
    manifest = data / "train.tsv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([str(tmp_path / "moved_away"), *lines[1:]]) + "\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:1: the audio root folder .*moved_away.* does not exist"):
        EATAudioDataset(str(manifest), CFG, on_error="skip")


def test_training_replaces_bad_clips_so_batches_stay_full_and_real(tmp_path: Path) -> None:
    data = make_audio_corpus(tmp_path, num_clips=16)
    manifest = data / "train.tsv"
    rels = _rows(manifest)
    bad = _first_frozen_batch(16, 4)
    for i in bad:
        (tmp_path / "audio" / rels[i]).unlink()
    ds = EATAudioDataset(str(manifest), CFG, on_error="skip", shuffle=True, seed=1)
    ds.set_epoch(1)
    items = [ds[i] for i in bad]
    batch = ds.collater(items)
    assert batch["net_input"]["source"].shape[0] == 4 and batch["skipped"] == 4 and not is_placeholder(batch)
    assert not set(batch["id"].tolist()) & set(bad)  # every clip is a readable one...
    for item in items:  # ...with that clip's own features
        assert torch.equal(item["source"], ds[item["id"]]["source"])
    # the same replacements in another process / a resumed run
    again = EATAudioDataset(str(manifest), CFG, on_error="skip", shuffle=True, seed=1)
    assert [again[i]["id"] for i in bad] == [item["id"] for item in items]


def test_training_with_nothing_readable_stops_with_a_clear_error(tmp_path: Path) -> None:
    data = make_audio_corpus(tmp_path, num_clips=4)
    for wav in (tmp_path / "audio").glob("*.wav"):
        wav.unlink()
    ds = EATAudioDataset(str(data / "train.tsv"), CFG, on_error="skip", shuffle=True)
    with pytest.raises(AudioError, match=r"none of 32 clips drawn to replace it could be read.*root folder"):
        ds[0]


def test_evaluation_drops_bad_clips_and_an_all_bad_batch_is_a_placeholder(tmp_path: Path) -> None:
    from eat_fairseq.fairseq_ext.datasets import EATLabelledDataset

    data = make_audio_corpus(tmp_path, num_clips=6)
    manifest = data / "valid.tsv"
    rels = _rows(manifest)
    for rel in rels[:3]:
        (tmp_path / "audio" / rel).unlink()
    ds = EATLabelledDataset(str(manifest), labels=[[i % 2] for i in range(6)], num_classes=2, multi_label=True,
                            features=CFG, on_error="skip", shuffle=False)
    batch = ds.collater([ds[i] for i in range(3)])
    assert is_placeholder(batch) and batch["skipped"] == 3
    assert batch["net_input"]["source"].shape == (0, 1, 128, 128) and batch["target"].shape == (0, 2)
    batch = ds.collater([ds[i] for i in range(2, 6)])
    assert batch["id"].tolist() == [3, 4, 5] and batch["skipped"] == 1 and not is_placeholder(batch)


def test_finetune_with_bad_first_batches_trains_and_validates(tmp_path: Path) -> None:
    """fairseq-hydra-train with on_bad_file=skip, the first training batch (fairseq's dummy batch)
    and the first validation batch all missing: fairseq asserted 'Invalid dummy batch: {}' before."""
    from test_finetune_fairseq import make_labelled_corpus

    from helpers import hydra_train_cmd

    data = make_labelled_corpus(tmp_path / "corpus", clips_per_split=8)
    audio = tmp_path / "corpus" / "audio"
    train_rels, valid_rels = _rows(data / "train.tsv"), _rows(data / "valid.tsv")
    for i in _first_frozen_batch(8, 4):
        (audio / train_rels[i]).unlink()
    for rel in valid_rels[:4]:  # validation keeps manifest order
        (audio / rel).unlink()
    configs = tmp_path / "configs"
    configs.mkdir()
    text = (REPO / "examples" / "finetuning" / "tiny.yaml").read_text()
    assert "\n  on_bad_file: raise" in text  # the recipe lists the option (README: options work as written)
    (configs / "skip.yaml").write_text(text.replace("\n  on_bad_file: raise", "\n  on_bad_file: skip", 1))
    assert "on_bad_file: skip" in (configs / "skip.yaml").read_text()
    out = run(hydra_train_cmd(configs, "skip", [f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
                                                "optimization.max_update=4"]), cwd=tmp_path)
    train = json_logs(out)
    assert [int(s["num_updates"]) for s in train] == [1, 2, 3, 4]
    assert all(float(s["bsz"]) == 4.0 for s in train), train  # full batches of real clips only
    assert sum(float(s.get("skipped_files", 0)) for s in train) > 0
    valid = json_logs(out, "valid")
    assert valid and all(float(v["valid_skipped_files"]) == 4 for v in valid), valid
    # mAP over the 4 readable validation clips (NaN would mean the placeholder confused the count)
    assert all(0.0 <= float(v["valid_mAP"]) <= 1.0 for v in valid), valid
