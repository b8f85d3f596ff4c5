"""Packed zip shards (manifests/pack.py): identical features from loose files and from shards,
labels and windows through shards, validate.py on shard rows, deterministic output."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eat_fairseq.data.clips import read_row
from eat_fairseq.data.features import FeatureConfig
from eat_fairseq.data.labels import LabelSet, read_split_labels
from eat_fairseq.data.manifest import read_manifest
from eat_fairseq.prep.pack import pack_manifests, parse_size
from eat_fairseq.prep.validate import validate_manifest
from helpers import REPO

# (name, seconds, rate, channels, subtype): the formats a corpus mixes
FORMATS = [
    ("a.wav", 1.0, 16000, 1, "PCM_16"),
    ("sub/b.wav", 1.6, 44100, 2, "PCM_24"),
    ("c.wav", 0.7, 22050, 1, "FLOAT"),
    ("d.flac", 1.2, 48000, 2, "PCM_16"),
    ("e.ogg", 1.1, 16000, 1, "VORBIS"),
    ("f.wav", 3.0, 8000, 1, "PCM_U8"),
    ("g.wav", 2.5, 16000, 1, "PCM_16"),
]


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    src = tmp_path / "loose"
    src.mkdir()
    rows, labels = [], []
    for i, (rel, sec, sr, ch, subtype) in enumerate(FORMATS):
        n = int(sec * sr)
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t) + 0.05 * rng.standard_normal(n)
        x = np.stack([x, -0.5 * x], 1) if ch == 2 else x
        (audio / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(audio / rel, x.astype(np.float32), sr, subtype=subtype)
        rows.append(f"{rel}\t{sf.info(audio / rel).frames}")
        labels.append(f"{rel.rsplit('.', 1)[0]}\t{'xy'[i % 2]}")
    # g.wav also as two windows (span rows)
    n_g = sf.info(audio / "g.wav").frames
    rows += ["g.wav:0:16000\t16000", f"g.wav:16000:{n_g - 16000}\t{n_g - 16000}"]
    labels += ["g@0\tx", "g@16000\ty"]
    (src / "train.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
    (src / "train.lbl").write_text("\n".join(labels) + "\n")
    (src / "valid.tsv").write_text(f"{audio}\n" + "\n".join(rows[:3]) + "\n")  # shared clips: stored once
    (src / "label_descriptors.csv").write_text("0,x\n1,y\n")
    (src / "excluded.tsv").write_text("path\treason\tdetail\n")  # not a manifest: ignored
    return src


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size("1.5k") == 1500


@pytest.mark.parametrize("flac", [False, True])
def test_pack_round_trip_identical_waveforms_and_labels(corpus: Path, tmp_path: Path, flac: bool) -> None:
    dest = tmp_path / "packed"
    report = pack_manifests(corpus, dest, shard_size=150_000, workers=2, flac=flac)
    assert report.splits == {"train": 9, "valid": 3} and report.members == 9 and report.shards > 2
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith("shard_")) == [
        "label_descriptors.csv", "train.lbl", "train.tsv", "valid.tsv"]
    root, packed = read_manifest(str(dest / "train.tsv"))
    _, loose = read_manifest(str(corpus / "train.tsv"))
    assert root == str(dest) and all(r.kind == "shard" for r in packed)
    assert [r.num_samples for r in packed] == [r.num_samples for r in loose]
    for a, b in zip(loose, packed):
        wa, sa = read_row(a)
        wb, sb = read_row(b)
        assert sa == sb and torch.equal(wa, wb), a.rel
    # the members are stored (uncompressed) and named after their source rows
    with zipfile.ZipFile(dest / "shard_000.zip") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.namelist()[0] == "a.wav"
    if flac:
        assert report.flac_members == 6  # the PCM wav sources a, b, f, g and the two spans of g
    # labels through shards: ids checked against the member names
    labels = read_split_labels(dest / "train.lbl", LabelSet(["x", "y"], ["x", "y"]), tsv_path=dest / "train.tsv")
    assert len(labels) == 9
    assert validate_manifest(dest / "train.tsv", labels=dest / "train.lbl",
                             descriptors=dest / "label_descriptors.csv", workers=2) == []


def test_pack_output_independent_of_workers_and_refuses_overwrite(corpus: Path, tmp_path: Path, capsys) -> None:
    from eat_fairseq.prep.pack import main

    args = [str(corpus), "--shard-size", "150KB", "--quiet"]
    assert main(args + ["--dest", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main(args + ["--dest", str(tmp_path / "two"), "--workers", "3"]) == 0
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        if name.endswith(".zip"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    capsys.readouterr()
    assert main(args + ["--dest", str(tmp_path / "one")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(args + ["--dest", str(tmp_path / "one"), "--force", "--shard-size", "10GB"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("shard_*")) == ["shard_000.zip"]  # no stale shards
    assert "9 clips in 1 shard(s)" in capsys.readouterr().out


def test_pack_and_windows_help_document_the_format() -> None:
    from eat_fairseq.prep import pack, windows

    out = pack.build_parser().format_help()
    assert "shard_NNN.zip:OFFSET:LENGTH<TAB>n_samples" in out and "--flac" in out and "--shard-size" in out
    assert "path:START:LENGTH<TAB>LENGTH" in windows.build_parser().format_help()
    for script in ("pack.py", "windows.py"):  # the thin scripts call these mains
        text = (REPO / "manifests" / script).read_text()
        assert f"from eat_fairseq.prep.{script[:-3]} import main" in text and "raise SystemExit(main())" in text


def test_validate_finds_bad_shard_rows(corpus: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    pack_manifests(corpus, dest, shard_size=10**9)
    lines = (dest / "train.tsv").read_text().splitlines()
    root, rows = lines[0], lines[1:]

    def with_row(k: int, address: str, n: str | None = None) -> list[str]:
        bad = list(rows)
        bad[k] = f"{address}\t{n if n is not None else rows[k].split(chr(9))[1]}"
        manifest = tmp_path / "bad.tsv"
        manifest.write_text("\n".join([root, *bad]) + "\n")
        return [p.message for p in validate_manifest(manifest)]

    name, offset, length = rows[1].split("\t")[0].split(":")
    offset, length = int(offset), int(length)
    assert "is not the start of a member's data" in with_row(1, f"{name}:{offset + 4}:{length}")[0]
    assert "holds" in with_row(1, f"{name}:{offset}:{length - 1}")[0]
    assert "shard not found" in with_row(1, f"shard_999.zip:{offset}:{length}")[0]
    assert "but the member has" in with_row(1, rows[1].split("\t")[0], "5")[0]
    # a compressed member cannot be read by byte range
    with zipfile.ZipFile(tmp_path / "deflated.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(corpus.parent / "audio" / "a.wav", "a.wav")
    (dest / "deflated.zip").write_bytes((tmp_path / "deflated.zip").read_bytes())
    with zipfile.ZipFile(dest / "deflated.zip") as z:
        info = z.infolist()[0]
    data_offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
    assert "is compressed" in with_row(0, f"deflated.zip:{data_offset}:{info.compress_size}")[0]


def test_features_identical_loose_and_packed_in_datasets(corpus: Path, tmp_path: Path) -> None:
    """The issue's check: every clip's features from loose files and from shards are identical,
    in the pre-training and the fine-tuning (labelled) dataset, with workers."""
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.datasets import EATLabelledDataset
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset

    cfg = FeatureConfig(target_length=128)
    for flac in (False, True):
        dest = tmp_path / f"packed{flac}"
        pack_manifests(corpus, dest, shard_size=200_000, flac=flac)
        for crop in ("start", "random"):
            loose = EATAudioDataset(str(corpus / "train.tsv"), cfg, shuffle=False, crop=crop)
            packed = EATAudioDataset(str(dest / "train.tsv"), cfg, shuffle=False, crop=crop)
            for ds in (loose, packed):
                ds.set_epoch(2)
            assert len(loose) == len(packed) == 9
            for i in range(len(loose)):
                assert torch.equal(loose[i]["source"], packed[i]["source"]), (flac, crop, i)
        labels = read_split_labels(dest / "train.lbl", LabelSet(["x", "y"], ["x", "y"]), tsv_path=dest / "train.tsv")
        ft = EATLabelledDataset(str(dest / "train.tsv"), labels=labels, num_classes=2, multi_label=False,
                                features=cfg, shuffle=False)
        loader = torch.utils.data.DataLoader(ft, batch_size=4, num_workers=2, collate_fn=ft.collater)
        batches = list(loader)
        got = torch.cat([b["net_input"]["source"] for b in batches])
        loose_ft = EATLabelledDataset(str(corpus / "train.tsv"), labels=labels, num_classes=2, multi_label=False,
                                      features=cfg, shuffle=False)
        assert torch.equal(got, torch.stack([loose_ft[i]["source"] for i in range(9)]))
        assert torch.cat([b["target"] for b in batches]).tolist() == [0, 1, 0, 1, 0, 1, 0, 0, 1]


def test_plain_wav_members_skip_libsndfile_bit_identically(corpus: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PCM-16 and float-32 WAV members are decoded with numpy (the fast path), and every read,
    whole or windowed, equals libsndfile's on the loose file; other encodings still use libsndfile."""
    from eat_fairseq.data import clips

    dest = tmp_path / "packed"
    pack_manifests(corpus, dest, shard_size=150_000)
    _, packed = read_manifest(str(dest / "train.tsv"))
    _, loose = read_manifest(str(corpus / "train.tsv"))
    fast = []
    original = clips._PcmClip.read

    def read(self, *args):
        fast.append(self._row.rel)
        return original(self, *args)

    monkeypatch.setattr(clips._PcmClip, "read", read)
    for i, (a, b) in enumerate(zip(loose, packed)):
        n = a.num_samples
        for start, count in [(0, -1), (0, 100), (37, 1000), (n - 5, 10), (n, 3)]:
            with clips.open_clip(a) as ca, clips.open_clip(b) as cb:
                assert (ca.samplerate, ca.channels, ca.frames) == (cb.samplerate, cb.channels, cb.frames)
                wa, wb = ca.read(start, count), cb.read(start, count)
                assert wa.dtype == wb.dtype == np.float32 and np.array_equal(wa, wb), (a.rel, start, count)
    # a.wav (PCM_16), c.wav (FLOAT), g.wav (PCM_16) and g's two span rows; not b (PCM_24), d, e, f (PCM_U8)
    names = {b.rel: a.rel for a, b in zip(loose, packed)}
    assert sorted({names[n] for n in fast}) == ["a.wav", "c.wav", "g.wav", "g.wav:0:16000",
                                                f"g.wav:16000:{loose[-1].num_samples}"]
