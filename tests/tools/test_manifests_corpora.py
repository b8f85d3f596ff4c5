"""Corpus writers on tiny fake corpora laid out like the real ones, plus the real FSDD when present."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat_fairseq.prep import audio_folder, audioset, esc50, fsdd, labeled_folder, speech_commands
from eat_fairseq.prep.validate import validate_manifest

FSDD_RECORDINGS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd" / "recordings"


def _wav(path: Path, frames: int, sr: int = 16000, fmt: str = "WAV") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * np.random.default_rng(frames).standard_normal(frames).astype("float32"), sr, format=fmt)


def _tsv(path: Path) -> tuple[str, list[tuple[str, int]]]:
    lines = path.read_text().splitlines()
    return lines[0], [(r.split("\t")[0], int(r.split("\t")[1])) for r in lines[1:]]


def _lbl(path: Path) -> list[tuple[str, list[str]]]:
    return [(r.split("\t")[0], r.split("\t")[1].split(",")) for r in path.read_text().splitlines()]


def _clean(data_dir: Path, split: str) -> None:
    assert validate_manifest(data_dir / f"{split}.tsv", labels=data_dir / f"{split}.lbl",
                             descriptors=data_dir / "label_descriptors.csv") == []


# ---------------------------------------------------------------------------------------- AudioSet

CLASSES = [("/m/a", "Speech"), ("/m/b", "Male speech, man speaking"), ("/m/c", "Music"), ("/m/d", "Dog")]


@pytest.fixture()
def audioset_dir(tmp_path: Path) -> Path:
    base = tmp_path / "as"
    with open(base.parent / "classes.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(["index", "mid", "display_name"])
        for i, (mid, name) in enumerate(CLASSES):
            w.writerow([i, mid, name])
    (base / "segments").mkdir(parents=True)
    (base / "segments" / "balanced.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=6, num_segs=6, num_unique_labels=4, num_positive_labels=9\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/a,/m/b"\n'
        'Yabc_1, 0.000, 10.000, "/m/a"\n'
        'plain, 5.500, 15.500, "/m/a,/m/c"\n'
        'gone, 0.000, 10.000, "/m/d"\n'
        'broken, 0.000, 10.000, "/m/c"\n'
        'unknownonly, 0.000, 10.000, "/m/zzz"\n')
    (base / "segments" / "more.csv").write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'plain, 5.500, 15.500, "/m/a,/m/c"\n'
        'extra, 1.000, 11.000, "/m/d,/m/zzz"\n')
    audio = base / "audio"
    _wav(audio / "part00" / "--PJHxphWEs_30.000.wav", 1000)
    _wav(audio / "part01" / "YYabc_1.flac", 1100, fmt="FLAC")
    _wav(audio / "plain.wav", 1200, sr=32000)
    _wav(audio / "part00" / "extra_1.000.wav", 1300)
    (audio / "broken.wav").write_bytes(b"")
    _wav(audio / "unknownonly.wav", 1400)
    return base


def _audioset_args(base: Path, split: str, *segments: str) -> list[str]:
    args = []
    for s in segments:
        args += ["--segments", str(base / "segments" / s)]
    return args + ["--split-name", split, "--audio-dir", str(base / "audio"),
                   "--labels", str(base.parent / "classes.csv"), "--dest", str(base / "data"), "--workers", "1"]


def test_audioset_outputs(audioset_dir: Path, capsys) -> None:
    base = audioset_dir
    assert audioset.main(_audioset_args(base, "train", "balanced.csv", "more.csv")) == 0
    data = base / "data"
    root, rows = _tsv(data / "train.tsv")
    assert root == str(base / "audio")
    assert rows == [("part00/--PJHxphWEs_30.000.wav", 1000), ("part01/YYabc_1.flac", 1100),
                    ("plain.wav", 1200), ("part00/extra_1.000.wav", 1300)]
    labels = _lbl(data / "train.lbl")
    assert labels == [("--PJHxphWEs", ["/m/a", "/m/b"]), ("Yabc_1", ["/m/a"]), ("plain", ["/m/a", "/m/c"]),
                      ("extra", ["/m/d"])]
    # counts over the written rows: /m/a 3, /m/b 1, /m/c 1, /m/d 1
    weights = [float(x) for x in (data / "train.weights").read_text().splitlines()]
    expected = [1000 / 3.01 + 1000 / 1.01, 1000 / 3.01, 1000 / 3.01 + 1000 / 1.01, 1000 / 1.01]
    assert weights == pytest.approx(expected, rel=1e-12)

    missing = [line.split("\t") for line in (data / "missing_train.tsv").read_text().splitlines()]
    assert missing[0] == ["ytid", "start_seconds", "end_seconds", "reason", "detail"]
    assert [(m[0], m[3]) for m in missing[1:]] == [("gone", "no-audio"), ("broken", "empty-file"),
                                                  ("unknownonly", "no-known-labels")]
    with open(data / "label_descriptors.csv", newline="") as f:
        assert list(csv.reader(f)) == [[str(i), mid, name] for i, (mid, name) in enumerate(CLASSES)]
    _clean(data, "train")
    out = capsys.readouterr().out
    assert "1 segment(s) with an already listed YTID skipped" in out
    assert "label(s) not in" in out and "/m/zzz" in out

    # a second split in the same folder shares label_descriptors.csv without --force
    assert audioset.main(_audioset_args(base, "eval", "more.csv")) == 0
    assert [r for r, _ in _tsv(data / "eval.tsv")[1]] == ["plain.wav", "part00/extra_1.000.wav"]
    assert audioset.main(_audioset_args(base, "eval", "more.csv")) == 2


def test_audioset_malformed_segments(audioset_dir: Path, capsys) -> None:
    (audioset_dir / "segments" / "bad.csv").write_text("# header\nabc, 0.0, 10.0\n")
    assert audioset.main(_audioset_args(audioset_dir, "x", "bad.csv")) == 2
    assert "bad.csv:2" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- ESC-50

def test_esc50_folds(tmp_path: Path) -> None:
    base = tmp_path / "ESC-50-master"
    (base / "meta").mkdir(parents=True)
    cats = {0: "dog", 1: "rain", 2: "crying_baby"}
    rows = []
    for fold in (1, 2, 3):
        for target in (0, 1, 2):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            rows.append(f"{name},{fold},{target},{cats[target]},False,{100 + target},A")
            if name != "2-101-A-1.wav":          # one clip of the metadata is missing on disk
                # at least one 25 ms fbank frame (1,103 samples at 44.1 kHz), else excluded as too-short
                _wav(base / "audio" / name, 1200 + 10 * fold + target, sr=44100)
    (base / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n" + "\n".join(rows) + "\n")

    dest = tmp_path / "esc"
    assert esc50.main([str(base), "--dest", str(dest), "--workers", "1"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["excluded.tsv", "fold1", "fold2", "fold3"]
    for k in (1, 2, 3):
        d = dest / f"fold{k}"
        _, train = _tsv(d / "train.tsv")
        _, held = _tsv(d / "eval.tsv")
        assert all(r.startswith(f"{k}-") for r, _ in held)
        assert not any(r.startswith(f"{k}-") for r, _ in train)
        assert len(train) + len(held) == 8
        for split, rows_ in (("train", train), ("eval", held)):
            lbl = _lbl(d / f"{split}.lbl")
            assert [cid for cid, _ in lbl] == [r[:-4] for r, _ in rows_]
            assert [labs for _, labs in lbl] == [[r.rsplit("-", 1)[1][:-4]] for r, _ in rows_]
            _clean(d, split)
        assert (d / "label_descriptors.csv").read_text() == "0,0,dog\n1,1,rain\n2,2,crying_baby\n"
    assert (dest / "excluded.tsv").read_text().splitlines()[1].startswith("2-101-A-1.wav\tmissing")


# ------------------------------------------------------------------------------- Speech Commands

def test_speech_commands_official_split(tmp_path: Path, capsys) -> None:
    base = tmp_path / "speech_commands_v0.02"
    for word in ("yes", "no", "up"):
        for spk in ("aa11_nohash_0", "bb22_nohash_0", "cc33_nohash_1"):
            _wav(base / word / f"{spk}.wav", 800 + len(word) * 10 + int(spk[-1]))
    _wav(base / "_background_noise_" / "white_noise.wav", 5000)
    (base / "LICENSE").write_text("CC BY 4.0\n")
    (base / "validation_list.txt").write_text("yes/bb22_nohash_0.wav\nno/bb22_nohash_0.wav\n")
    (base / "testing_list.txt").write_text("up/cc33_nohash_1.wav\nyes/cc33_nohash_1.wav\nno/zz99_nohash_0.wav\n")

    dest = tmp_path / "spc"
    assert speech_commands.main([str(base), "--dest", str(dest), "--workers", "1"]) == 0
    splits = {s: [r for r, _ in _tsv(dest / f"{s}.tsv")[1]] for s in ("train", "valid", "test")}
    assert splits["valid"] == ["no/bb22_nohash_0.wav", "yes/bb22_nohash_0.wav"]
    assert splits["test"] == ["up/cc33_nohash_1.wav", "yes/cc33_nohash_1.wav"]
    assert len(splits["train"]) == 5 and "no/cc33_nohash_1.wav" in splits["train"]
    assert not any("_background_noise_" in r for s in splits.values() for r in s)
    assert _lbl(dest / "test.lbl") == [("up/cc33_nohash_1", ["up"]), ("yes/cc33_nohash_1", ["yes"])]
    assert (dest / "label_descriptors.csv").read_text() == "0,no\n1,up\n2,yes\n"
    for s in splits:
        _clean(dest, s)
    assert "no/zz99_nohash_0.wav\tmissing" in (dest / "excluded.tsv").read_text()
    assert "found 3 word folders; Speech Commands v2 has 35" in capsys.readouterr().out


# ------------------------------------------------------------------------------- labeled folder

@pytest.fixture()
def class_root(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    for cls in ("cat", "dog"):
        for i in range(6):
            _wav(root / cls / f"{cls}{i}.wav", 400 + i)  # >= 400 samples: one fbank frame at 16 kHz
    _wav(root / "dog" / "nested" / "deep.flac", 433, fmt="FLAC")
    (root / "cat" / "bad.wav").write_text("nope")
    _wav(root / "stray.wav", 100)
    return root


def test_labeled_folder_percent_split(class_root: Path, tmp_path: Path) -> None:
    dest = tmp_path / "lf"
    assert labeled_folder.main([str(class_root), "--dest", str(dest), "--valid-percent", "30", "--seed", "1",
                                "--workers", "1"]) == 0
    train = [r for r, _ in _tsv(dest / "train.tsv")[1]]
    valid = [r for r, _ in _tsv(dest / "valid.tsv")[1]]
    assert len(train) + len(valid) == 13 and not set(train) & set(valid) and valid
    assert "dog/nested/deep.flac" in train + valid
    assert (dest / "label_descriptors.csv").read_text() == "0,cat\n1,dog\n"
    all_labels = dict(_lbl(dest / "train.lbl") + _lbl(dest / "valid.lbl"))
    assert all_labels["dog/nested/deep"] == ["dog"] and all_labels["cat/cat0"] == ["cat"]
    for s in ("train", "valid"):
        _clean(dest, s)
    assert "cat/bad.wav\tnot-audio" in (dest / "excluded.tsv").read_text()
    first = (dest / "valid.tsv").read_bytes()
    assert labeled_folder.main([str(class_root), "--dest", str(dest), "--valid-percent", "30", "--seed", "1",
                                "--workers", "2", "--force"]) == 0
    assert (dest / "valid.tsv").read_bytes() == first


def test_labeled_folder_lists(class_root: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("# training\ncat/cat0.wav\ncat/cat1.wav\ndog/dog0.wav\n")
    (lists / "valid.txt").write_text("cat/cat2.wav\n./dog/dog1.wav\n")
    (lists / "test.txt").write_text("dog/dog2.wav\ndog/absent.wav\n")
    dest = tmp_path / "lf"
    argv = [str(class_root), "--dest", str(dest), "--train-list", str(lists / "train.txt"),
            "--valid-list", str(lists / "valid.txt"), "--test-list", str(lists / "test.txt"), "--workers", "1"]
    assert labeled_folder.main(argv) == 0
    assert [r for r, _ in _tsv(dest / "train.tsv")[1]] == ["cat/cat0.wav", "cat/cat1.wav", "dog/dog0.wav"]
    assert [r for r, _ in _tsv(dest / "valid.tsv")[1]] == ["cat/cat2.wav", "dog/dog1.wav"]
    assert [r for r, _ in _tsv(dest / "test.tsv")[1]] == ["dog/dog2.wav"]
    reasons = [line.split("\t")[:2] for line in (dest / "excluded.tsv").read_text().splitlines()[1:]]
    assert ["dog/absent.wav", "missing"] in reasons and ["cat/cat5.wav", "unlisted"] in reasons
    for s in ("train", "valid", "test"):
        _clean(dest, s)
    with pytest.raises(SystemExit):
        labeled_folder.main(argv + ["--seed", "3"])


# ------------------------------------------------------------------------------------------ FSDD

def test_fsdd_fake(tmp_path: Path) -> None:
    rec = tmp_path / "recordings"
    for digit, speaker, take in [(0, "jackson", 0), (0, "jackson", 4), (3, "theo", 5), (3, "theo", 9),
                                 (9, "lucas", 10), (9, "lucas", 49)]:
        _wav(rec / f"{digit}_{speaker}_{take}.wav", 400 + take, sr=8000)
    _wav(rec / "readme_sample.wav", 400, sr=8000)
    dest = tmp_path / "fsdd"
    assert fsdd.main([str(rec), "--dest", str(dest), "--workers", "1"]) == 0
    assert [r for r, _ in _tsv(dest / "test.tsv")[1]] == ["0_jackson_0.wav", "0_jackson_4.wav"]
    assert [r for r, _ in _tsv(dest / "valid.tsv")[1]] == ["3_theo_5.wav", "3_theo_9.wav"]
    assert _tsv(dest / "train.tsv")[1] == [("9_lucas_10.wav", 410), ("9_lucas_49.wav", 449)]
    assert _lbl(dest / "valid.lbl") == [("3_theo_5", ["3"]), ("3_theo_9", ["3"])]
    assert (dest / "label_descriptors.csv").read_text().splitlines()[9] == "9,9,nine"
    assert "readme_sample.wav\tbad-name" in (dest / "excluded.tsv").read_text()
    for s in ("train", "valid", "test"):
        _clean(dest, s)


@pytest.mark.skipif(not FSDD_RECORDINGS.is_dir(), reason="shared FSDD recordings not present")
def test_real_fsdd(tmp_path: Path) -> None:
    assert fsdd.main([str(FSDD_RECORDINGS), "--dest", str(tmp_path / "fsdd"), "--workers", "2"]) == 0
    counts = {s: len(_tsv(tmp_path / "fsdd" / f"{s}.tsv")[1]) for s in ("train", "valid", "test")}
    assert counts == {"train": 2400, "valid": 300, "test": 300}
    assert (tmp_path / "fsdd" / "excluded.tsv").read_text() == "path\treason\tdetail\n"

    assert audio_folder.main([str(FSDD_RECORDINGS), "--dest", str(tmp_path / "af"), "--workers", "2",
                              "--valid-percent", "10"]) == 0
    rows = _tsv(tmp_path / "af" / "train.tsv")[1] + _tsv(tmp_path / "af" / "valid.tsv")[1]
    assert len(rows) == 3000
    fsdd_rows = {r for s in ("train", "valid", "test") for r in _tsv(tmp_path / "fsdd" / f"{s}.tsv")[1]}
    assert set(rows) == fsdd_rows
