"""eat-extract and eat-tag: inputs (files, folders, manifests), outputs, error handling, no fairseq."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat_fairseq.api import load_model
from eat_fairseq.cli.extract import main as extract_main
from eat_fairseq.cli.tag import main as tag_main

from test_api import LABELS, tone, write_classifier, write_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    sf.write(audio / "a.wav", tone(1.0, seed=1), 16000)
    sf.write(audio / "sub" / "b.flac", tone(2.9, sr=22050, seed=2, channels=2).T, 22050)  # 3 windows, stereo
    sf.write(audio / "sub" / "c.wav", tone(0.6, sr=8000, seed=3), 8000)
    (audio / "notes.txt").write_text("not audio, not picked up from folders")
    (audio / "broken.wav").write_bytes(b"RIFF garbage")
    manifest = root / "train.tsv"
    manifest.write_text(f"{audio}\na.wav\t16000\nsub/b.flac\t63945\nbroken.wav\t10\nsub/c.wav\t4800\n")
    return {
        "root": root,
        "audio": audio,
        "manifest": manifest,
        "pre": write_pretrained(root / "pre.pt"),
        "cls": write_classifier(root / "cls.pt"),
    }


def test_extract_folder_mirrors_paths_and_skips_bad_files(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    rc = extract_main(["--checkpoint", str(env["pre"]), str(env["audio"]), "--out", str(out), "--granularity", "frame"])
    assert rc == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert files == ["a.npy", "sub/b.npy", "sub/c.npy"]
    handle = load_model(env["pre"])
    for rel, src in (("a.npy", "a.wav"), ("sub/b.npy", "sub/b.flac"), ("sub/c.npy", "sub/c.wav")):
        np.testing.assert_allclose(
            np.load(out / rel), handle.extract(str(env["audio"] / src), granularity="frame"), atol=1e-5
        )
    errors = (out / "errors.tsv").read_text().splitlines()
    assert errors[0] == "path\terror" and len(errors) == 2 and "broken.wav" in errors[1]
    err = capsys.readouterr().err
    assert "1 of 4 files failed" in err and "broken.wav" in err


def test_extract_single_files_utterance_and_all(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    a, b = env["audio"] / "a.wav", env["audio"] / "sub" / "b.flac"
    assert extract_main(["--checkpoint", str(env["pre"]), str(a), str(b), "--out", str(out), "--batch-size", "1"]) == 0
    assert np.load(out / "a.npy").shape == (64,)
    assert np.load(out / "b.npy").shape == (64,)
    assert not (out / "errors.tsv").exists()
    assert extract_main(["--checkpoint", str(env["pre"]), str(b), "--out", str(out), "--granularity", "all", "--layer", "0"]) == 0
    with np.load(out / "b.npz") as data:
        ref = load_model(env["pre"]).extract(str(b), granularity="all", layer=0)
        assert set(data.files) == set(ref)
        for key in ref:
            np.testing.assert_allclose(data[key], ref[key], atol=1e-5)


def test_extract_manifest_writes_npz_and_index(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    rc = extract_main(["--checkpoint", str(env["pre"]), str(env["manifest"]), "--out", str(out), "--granularity", "frame", "--batch-size", "3"])
    assert rc == 0
    index = [line.split("\t") for line in (out / "train.index.tsv").read_text().splitlines()]
    assert index[0] == ["row", "path", "manifest_line", "num_patches"]
    assert [row[1] for row in index[1:]] == ["a.wav", "sub/b.flac", "sub/c.wav"]
    assert [row[2] for row in index[1:]] == ["2", "3", "5"]
    handle = load_model(env["pre"])
    with np.load(out / "train.npz") as data:
        offsets = data["offsets"]
        assert offsets[0] == 0 and offsets[-1] == data["frame"].shape[0] == data["timestamps"].shape[0]
        for i, row in enumerate(index[1:]):
            ref = handle.extract(str(env["audio"] / row[1]), granularity="frame")
            assert int(row[3]) == ref.shape[0] == offsets[i + 1] - offsets[i]
            np.testing.assert_allclose(data["frame"][offsets[i] : offsets[i + 1]], ref, atol=1e-5)
    assert "broken.wav" in (out / "errors.tsv").read_text()
    assert extract_main(["--checkpoint", str(env["pre"]), str(env["manifest"]), "--out", str(out)]) == 0
    with np.load(out / "train.npz") as data:
        assert data["utterance"].shape == (3, 64)


def test_extract_exit_codes(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    broken = env["audio"] / "broken.wav"
    assert extract_main(["--checkpoint", str(env["pre"]), str(broken), str(tmp_path / "missing.wav"), "--out", str(out)]) == 1
    assert len((out / "errors.tsv").read_text().splitlines()) == 3
    assert extract_main(["--checkpoint", str(tmp_path / "nope.pt"), str(env["audio"]), "--out", str(out)]) == 1
    a = str(env["audio"] / "a.wav")
    assert extract_main(["--checkpoint", str(env["pre"]), a, a, "--out", str(out)]) == 0  # same output name twice
    collision = (out / "errors.tsv").read_text().splitlines()
    assert len(collision) == 2 and "would overwrite" in collision[1]
    with pytest.raises(SystemExit) as exc:
        extract_main(["--checkpoint", str(env["pre"]), str(env["audio"])])  # no --out
    assert exc.value.code == 2


def test_tag_text_and_json(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a = str(env["audio"] / "a.wav")
    assert tag_main(["--checkpoint", str(env["cls"]), a, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == a and len(lines) == 4
    scores = [float(line.split()[0]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)

    assert tag_main(["--checkpoint", str(env["cls"]), str(env["audio"]), "--json", "--top-k", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"results", "errors"}
    assert len(data["results"]) == 3 and list(data["errors"]) == [str(env["audio"] / "broken.wav")]
    top = data["results"][a]
    ref = load_model(env["cls"]).predict(a, top_k=2)
    assert [(t["label"], pytest.approx(t["score"], abs=1e-5)) for t in top] == ref
    assert all(t["label"] in LABELS and t["name"] == t["label"] for t in top)


def test_tag_display_names(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = str(env["audio"] / "a.wav")
    audioset_style = tmp_path / "class_labels_indices.csv"
    audioset_style.write_text(
        "index,mid,display_name\n" + "".join(f'{i},{label},"The {label}, loud"\n' for i, label in enumerate(LABELS))
    )
    assert tag_main(["--checkpoint", str(env["cls"]), a, "--labels", str(audioset_style), "--json", "--top-k", "5"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][a]
    assert all(t["name"] == f"The {t['label']}, loud" for t in top)

    by_index = tmp_path / "label_descriptors.csv"
    by_index.write_text("".join(f"{i},class{i},Name {i}\n" for i in range(len(LABELS))))
    assert tag_main(["--checkpoint", str(env["cls"]), a, "--labels", str(by_index), "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    assert "by class index" in captured.err
    first = captured.out.splitlines()[1]
    assert "Name " in first and "(" in first  # name plus the checkpoint's own label

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("0,x\n1,y\n")
    assert tag_main(["--checkpoint", str(env["cls"]), a, "--labels", str(wrong)]) == 2


def test_tag_rejects_pretraining_checkpoints(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert tag_main(["--checkpoint", str(env["pre"]), str(env["audio"] / "a.wav")]) == 1
    err = capsys.readouterr().err
    assert "pretrained checkpoint without a classification head" in err and "eat-extract" in err


def test_tag_all_files_bad(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert tag_main(["--checkpoint", str(env["cls"]), str(env["audio"] / "broken.wav")]) == 1
    assert "1 of 1 files failed" in capsys.readouterr().err


BLOCKER = """
import importlib.abc, importlib.machinery, sys

BLOCKED = {"fairseq", "fairseq_cli", "hydra", "omegaconf"}
ATTEMPTS = []

class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is blocked in this test")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None

sys.meta_path.insert(0, Blocker())
"""


def test_both_clis_run_with_fairseq_blocked(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    script = BLOCKER + textwrap.dedent(
        f"""
        try:
            import fairseq  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not work")
        from eat_fairseq.cli.extract import main as extract_main
        from eat_fairseq.cli.tag import main as tag_main
        rc1 = extract_main(["--checkpoint", {str(env["pre"])!r}, {str(env["audio"])!r}, "--out", {str(out)!r}, "--granularity", "frame"])
        rc2 = tag_main(["--checkpoint", {str(env["cls"])!r}, {str(env["audio"] / "a.wav")!r}, "--json"])
        import eat_fairseq.hear  # noqa: F401
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("RESULT", rc1, rc2, leaked, sorted(set(ATTEMPTS)))
        """
    )
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # only the guarded probe in eat_fairseq/__init__.py (and the check above) ever asks for fairseq
    assert "RESULT 0 0 [] ['fairseq']" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.rglob("*.npy")) == ["a.npy", "b.npy", "c.npy"]
    tagged = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert list(tagged["results"]) == [str(env["audio"] / "a.wav")]
