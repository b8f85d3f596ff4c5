"""audio_folder, validate and balanced_weights: generated folders with good and broken audio."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat_fairseq.prep import audio_folder, balanced_weights, validate
from eat_fairseq.prep.audio_folder import write_audio_folder_manifest
from eat_fairseq.prep.balanced_weights import balanced_weights as weights_of
from eat_fairseq.prep.common import OutputExistsError, in_valid_split, probe_audio
from eat_fairseq.data.labels import clip_id_matches
from eat_fairseq.prep.validate import validate_manifest

REPO = Path(__file__).resolve().parents[2]

# relative path -> (frames, sample rate, soundfile format)
GOOD = {
    "a.wav": (1600, 16000, "WAV"),
    "sub/b.flac": (4410, 44100, "FLAC"),
    "sub/deeper/c.ogg": (22050, 22050, "OGG"),
    "sub/D.WAV": (8000, 8000, "WAV"),
    "e.flac": (3000, 16000, "FLAC"),
}


def _write(path: Path, frames: int, sr: int, fmt: str, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(frames)
    data = (0.1 * rng.standard_normal((frames, channels))).astype("float32")
    sf.write(path, data, sr, format=fmt)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel, (frames, sr, fmt) in GOOD.items():
        _write(root / rel, frames, sr, fmt, channels=2 if rel == "e.flac" else 1)
    (root / "empty.wav").write_bytes(b"")
    (root / "sub" / "text.wav").write_text("this is not audio\n" * 20)
    sf.write(root / "zero.wav", np.zeros((0, 1), "float32"), 16000)
    (root / "notes.txt").write_text("ignored: not an audio extension\n")
    hidden = root / ".cache"
    hidden.mkdir()
    _write(hidden / "skipped.wav", 100, 16000, "WAV")
    return root


def _rows(tsv: Path) -> tuple[str, list[tuple[str, int]]]:
    lines = tsv.read_text().splitlines()
    return lines[0], [(r.split("\t")[0], int(r.split("\t")[1])) for r in lines[1:]]


def test_audio_folder_writes_readable_files_and_reports_broken(folder: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "out"
    rc = audio_folder.main([str(folder), "--dest", str(dest), "--valid-percent", "40", "--seed", "3",
                            "--workers", "1", "--quiet"])
    assert rc == 0
    root_t, train = _rows(dest / "train.tsv")
    root_v, valid = _rows(dest / "valid.tsv")
    assert root_t == root_v == str(folder)
    assert train == sorted(train) and valid == sorted(valid)
    assert dict(train + valid) == {rel: frames for rel, (frames, _, _) in GOOD.items()}
    assert {rel for rel, _ in valid} == {rel for rel in GOOD if in_valid_split(rel, 3, 40)}

    excluded = (dest / "excluded.tsv").read_text().splitlines()
    assert excluded[0] == "path\treason\tdetail"
    reasons = {line.split("\t")[0]: line.split("\t")[1] for line in excluded[1:]}
    assert reasons == {"empty.wav": "empty-file", "sub/text.wav": "not-audio", "zero.wav": "zero-length"}

    out = capsys.readouterr().out
    assert "total: 5 rows" in out
    assert "excluded: 3 (empty-file: 1, not-audio: 1, zero-length: 1)" in out
    hours = sum(frames / sr for frames, sr, _ in GOOD.values()) / 3600
    assert f"{hours:.3f} h" in out


def test_audio_folder_rerun_is_byte_identical_and_needs_force(folder: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "out"
    report = write_audio_folder_manifest(folder, dest, valid_percent=50, seed=7, workers=2)
    assert report.total_rows == len(GOOD)
    first = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert set(first) == {"train.tsv", "valid.tsv", "excluded.tsv"}

    with pytest.raises(OutputExistsError):
        write_audio_folder_manifest(folder, dest, valid_percent=50, seed=7)
    assert audio_folder.main([str(folder), "--dest", str(dest), "--valid-percent", "50", "--seed", "7"]) == 2
    assert "use --force" in capsys.readouterr().err

    assert audio_folder.main([str(folder), "--dest", str(dest), "--valid-percent", "50", "--seed", "7",
                              "--workers", "1", "--force"]) == 0
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == first


def test_audio_folder_valid_percent_zero_and_extension_filter(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    report = write_audio_folder_manifest(folder, dest, exts="flac,.WAV", valid_percent=0)
    assert (dest / "valid.tsv").read_text() == f"{folder}\n"
    _, train = _rows(dest / "train.tsv")
    assert [rel for rel, _ in train] == ["a.wav", "e.flac", "sub/D.WAV", "sub/b.flac"]
    assert report.splits["valid"].rows == 0


def test_valid_split_depends_on_seed_and_is_stable() -> None:
    keys = [f"dir/{i}.wav" for i in range(2000)]
    a = {k for k in keys if in_valid_split(k, 0, 10)}
    assert a == {k for k in keys if in_valid_split(k, 0, 10)}
    assert a != {k for k in keys if in_valid_split(k, 1, 10)}
    assert 140 < len(a) < 260
    assert not any(in_valid_split(k, 0, 0) for k in keys) and all(in_valid_split(k, 0, 100) for k in keys)


def test_probe_detects_truncated_flac(tmp_path: Path) -> None:
    path = tmp_path / "t.flac"
    _write(path, 16000, 16000, "FLAC")
    assert probe_audio(str(path)).ok
    os.truncate(path, path.stat().st_size // 2)
    assert probe_audio(str(path)).reason == "read-error"
    assert probe_audio(str(tmp_path / "nope.wav")).reason == "missing"


def test_audio_folder_missing_root_is_an_error(tmp_path: Path, capsys) -> None:
    assert audio_folder.main([str(tmp_path / "absent"), "--dest", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- validate

@pytest.fixture()
def manifest(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    write_audio_folder_manifest(folder, dest, valid_percent=0)
    return dest / "train.tsv"


def _lines_of(problems) -> list[tuple[int, str]]:
    return [(p.line, p.message) for p in problems]


def test_validate_clean_manifest(manifest: Path, capsys) -> None:
    assert validate_manifest(manifest) == []
    assert validate.main([str(manifest), "--workers", "2"]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_finds_injected_errors_with_line_numbers(manifest: Path, folder: Path, capsys) -> None:
    lines = manifest.read_text().splitlines()
    # lines: 1 root, 2 a.wav, 3 e.flac, 4 sub/D.WAV, 5 sub/b.flac, 6 sub/deeper/c.ogg
    assert lines[1].startswith("a.wav\t") and lines[2].startswith("e.flac\t")
    lines[2] = "e.flac\t2999"                 # wrong count on line 3
    lines[3] = "sub/D.WAV 8000"               # malformed (space, not tab) on line 4
    lines.append("gone.wav\t100")             # line 7: missing file
    lines.append(lines[1])                    # line 8: duplicate of line 2
    lines.append("sub/text.wav\t10")          # line 9: not audio
    lines.append("a.wav\tabc")                # line 10: bad count (the row is refused, as training refuses it)
    manifest.write_text("\n".join(lines) + "\n")

    found = _lines_of(validate_manifest(manifest, workers=2))
    assert [line for line, _ in found] == [3, 4, 7, 8, 9, 10]
    messages = dict(found)
    assert "n_samples is 2999 but the file has 3000 frames" in messages[3]
    assert "expected 'relative/path<TAB>n_samples', got 1 field(s)" in messages[4]
    assert "n_samples is not an integer: 'abc'" in messages[10]
    assert "file not found: gone.wav" in messages[7]
    assert "duplicate of line 2" in messages[8]
    assert "not-audio" in messages[9]

    assert validate.main([str(manifest), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{manifest}:7: file not found: gone.wav" in out


def test_validate_bad_root(manifest: Path, tmp_path: Path) -> None:
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([str(tmp_path / "elsewhere")] + lines[1:]) + "\n")
    problems = validate_manifest(manifest)
    assert _lines_of(problems) == [(1, f"root directory does not exist: {tmp_path / 'elsewhere'}")]
    manifest.write_text("\n".join(lines[1:]) + "\n")   # root line forgotten
    assert [p.line for p in validate_manifest(manifest)] == [1]


def test_validate_labels_alignment_and_ids(manifest: Path, tmp_path: Path) -> None:
    rels = [line.split("\t")[0] for line in manifest.read_text().splitlines()[1:]]
    lbl = tmp_path / "train.lbl"
    good = [f"{rel.rsplit('.', 1)[0]}\tx" for rel in rels]
    lbl.write_text("\n".join(good) + "\n")
    desc = tmp_path / "label_descriptors.csv"
    desc.write_text("index,label\n0,x\n")
    assert validate_manifest(manifest, labels=lbl, descriptors=desc) == []

    bad = list(good)
    bad[0], bad[1] = bad[1], bad[0]           # ids swapped: label lines 1 and 2 mismatch
    bad[2] = bad[2].replace("\tx", "\ty")     # label not in descriptors (line 3)
    bad[3] = bad[3].replace("\t", " ")        # malformed line 4
    lbl.write_text("\n".join(bad[:-1]) + "\n")  # one line short
    found = _lines_of(validate_manifest(manifest, labels=lbl, descriptors=desc))
    assert found[0][0] == 0 and "4 label lines but the manifest has 5 rows" in found[0][1]
    assert [line for line, _ in found[1:]] == [1, 2, 3, 4]
    assert "does not match manifest line 2" in found[1][1]
    assert "label y is not in" in found[3][1]
    assert "expected 2 tab-separated fields" in found[4][1]


def test_validate_skips_blank_manifest_lines_as_training_does(manifest: Path, tmp_path: Path) -> None:
    """Label line k belongs to the k-th data row, also when a blank line sits between rows."""
    from eat_fairseq.data.labels import read_label_descriptors, read_split_labels

    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines[:3], "", *lines[3:]]) + "\n")
    lbl, desc = tmp_path / "train.lbl", tmp_path / "label_descriptors.csv"
    lbl.write_text("".join(f"{line.split(chr(9))[0].rsplit('.', 1)[0]}\tx\n" for line in lines[1:]))
    desc.write_text("0,x\n")
    assert len(read_split_labels(lbl, read_label_descriptors(desc), tsv_path=manifest)) == 5  # training: fine
    assert validate_manifest(manifest, labels=lbl, descriptors=desc) == []
    lbl.write_text(lbl.read_text().replace("e\tx", "zz\tx"))  # the 2nd row: manifest line 3
    assert _lines_of(validate_manifest(manifest, labels=lbl, descriptors=desc)) == [
        (2, "clip id zz does not match manifest line 3 (e.flac)")]


@pytest.mark.parametrize(("clip_id", "rel", "ok"), [
    ("--PJHxphWEs", "x/--PJHxphWEs_30.000.wav", True),
    ("--PJHxphWEs", "Y--PJHxphWEs.flac", True),
    ("abc", "abc.wav", True),
    ("yes/0a7c_nohash_0", "yes/0a7c_nohash_0.wav", True),
    ("abc.wav", "abc.wav", True),             # the file name, as training accepts it
    ("d/abc.wav", "d/abc.wav", True),         # the relative path
    ("abd", "abc.wav", False),
    ("no/0a7c_nohash_0", "yes/0a7c_nohash_0.wav", False),
])
def test_clip_id_matches(clip_id: str, rel: str, ok: bool) -> None:
    assert clip_id_matches(clip_id, rel) is ok


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0]


LABEL_CASES = {  # name -> (label line per row given the row's path, descriptors file text)
    "stems": (lambda rel: f"{_stem(rel)}\tx", "index,label\n0,x\n1,y\n"),
    "file names, spaces": (lambda rel: f" {os.path.basename(rel)} \t x , y ", "0,x\n1,y\n"),
    "paths": (lambda rel: f"{rel}\tx", "0,x\n"),
    "empty item": (lambda rel: f"{_stem(rel)}\tx,,y", "idx,label\n0,x\n1,y\n"),
    "unknown label": (lambda rel: f"{_stem(rel)}\tz", "0,x\n"),
    "no labels": (lambda rel: f"{_stem(rel)}\t ", "0,x\n"),
    "other file's id": (lambda rel: "zz\tx", "0,x\n"),
    "indices not from 0": (lambda rel: f"{_stem(rel)}\tx", "1,x\n"),
    "repeated label": (lambda rel: f"{_stem(rel)}\tx", "0,x\n1,x\n"),
    "repeated index": (lambda rel: f"{_stem(rel)}\tx", "0,x\n0,y\n"),
    "trailing blank lines": (lambda rel: f"{_stem(rel)}\tx" + ("\n\n" if rel.startswith("sub/deeper") else ""),
                             "0,x\n"),
    "blank line inside": (lambda rel: f"{_stem(rel)}\tx" + ("\n" if rel.startswith("a.") else ""), "0,x\n"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_validate_flags_labels_exactly_where_training_rejects_them(manifest: Path, tmp_path: Path,
                                                                   case: str) -> None:
    """One reader for labels: the validator reports a problem iff fine-tuning's reader refuses the files."""
    from eat_fairseq.data.labels import LabelError, read_label_descriptors, read_split_labels

    line_of, descriptors = LABEL_CASES[case]
    rels = [line.split("\t")[0] for line in manifest.read_text().splitlines()[1:]]
    lbl, desc = tmp_path / "train.lbl", tmp_path / "label_descriptors.csv"
    lbl.write_text("\n".join(line_of(rel) for rel in rels) + "\n")
    desc.write_text(descriptors)
    try:
        read_split_labels(lbl, read_label_descriptors(desc), tsv_path=manifest)
        training_refuses = False
    except LabelError:
        training_refuses = True
    problems = validate_manifest(manifest, labels=lbl, descriptors=desc)
    assert bool(problems) == training_refuses, (case, problems)
    if case == "repeated label":  # the descriptor's own line, without the path repeated in the message
        assert _lines_of(problems) == [(2, "label 'x' repeated (first on line 1)")]


ROW_CASES = [
    "a.wav\t3000\textra",                   # three fields
    "a.wav 3000",                            # space, not tab
    "a.wav\tabc",                            # not an integer
    "a.wav\t99999999999999999999",           # beyond int64: training refuses it before numpy would
    "a.wav:5:0\t0",                          # empty span
    "a.wav:0:100\t99",                       # count differs from the span
]


@pytest.mark.parametrize("row", ROW_CASES)
def test_validate_refuses_rows_with_training_readers_reason(manifest: Path, row: str) -> None:
    """One row check: a row training's reader refuses is flagged by the validator with the same words."""
    from eat_fairseq.data.manifest import ManifestError, read_manifest

    manifest.write_text(manifest.read_text() + row + "\n")
    line = len(manifest.read_text().splitlines())
    with pytest.raises(ManifestError) as refused:
        read_manifest(str(manifest))
    reason = str(refused.value).split(f":{line}: ", 1)[1]
    assert (line, reason) in _lines_of(validate_manifest(manifest))


# ------------------------------------------------------------------------------ balanced weights

def test_balanced_weights_formula() -> None:
    lists = [["a"], ["a", "b"], ["b", "b"], ["c"], []]
    w = weights_of(lists)
    # counts over clips: a 2, b 2 (repeated within a clip counts once), c 1
    expected = [1000 / 2.01, 1000 / 2.01 + 1000 / 2.01, 1000 / 2.01, 1000 / 1.01, 0.0]
    assert w == pytest.approx(expected, rel=1e-12)
    assert w[3] > w[0]   # the rarer label weighs more


def test_balanced_weights_cli(tmp_path: Path) -> None:
    lbl = tmp_path / "x.lbl"
    lbl.write_text("c1\t/m/a,/m/b\nc2\t/m/a\nc3\t/m/a\n")
    out = tmp_path / "x.weights"
    assert balanced_weights.main([str(lbl), "--out", str(out)]) == 0
    got = [float(x) for x in out.read_text().splitlines()]
    assert got == pytest.approx([1000 / 3.01 + 1000 / 1.01, 1000 / 3.01, 1000 / 3.01], rel=1e-12)
    assert balanced_weights.main([str(lbl), "--out", str(out)]) == 2
    lbl.write_text("c1 /m/a\n")
    assert balanced_weights.main([str(lbl), "--out", str(out), "--force"]) == 2


def test_thin_script_help() -> None:
    res = subprocess.run([sys.executable, str(REPO / "manifests" / "audio_folder.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: audio_folder.py")
    assert "relative/path<TAB>n_samples" in res.stdout and "--force" in res.stdout


def test_prep_weights_equal_trainings_fallback_and_read_labels_as_training_does(tmp_path: Path) -> None:
    """Two spellings of one formula (strings for the tool, class indices for training): held equal."""
    from eat_fairseq.data.sampling import balanced_weights as training_weights

    rng = np.random.default_rng(0)
    names = [f"/m/{i}" for i in range(30)]
    lists = [[names[k] for k in rng.integers(0, 30, size=rng.integers(1, 12))] for _ in range(200)]
    indices = [sorted({int(name[3:]) for name in labels}) for labels in lists]
    assert weights_of(lists) == pytest.approx(training_weights(indices, 30).tolist(), rel=1e-13)
    lbl = tmp_path / "x.lbl"
    lbl.write_text("c1\t/m/a, /m/b\nc2\t/m/b,,\n")  # spaces and empty items: as fine-tuning reads them
    assert balanced_weights.read_label_lists(lbl) == [["/m/a", "/m/b"], ["/m/b"]]
