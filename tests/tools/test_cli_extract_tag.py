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

from eat_fairseq.inference.api import load_model
from eat_fairseq.cli.extract import main as extract_main
from eat_fairseq.cli.tag import main as tag_main

from test_api import LABELS, tone, write_classifier, write_pretrained

REPO = Path(__file__).resolve().parents[2]


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
    assert rc == 1  # the others are written, but a failure is not a success
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
    assert np.load(out / "sub" / "b.npy").shape == (64,)  # named below the folder holding both inputs
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
    assert rc == 1  # broken.wav
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
    assert extract_main(["--checkpoint", str(env["pre"]), str(env["manifest"]), "--out", str(out), "--force"]) == 1
    with np.load(out / "train.npz") as data:
        assert data["utterance"].shape == (3, 64)


@pytest.mark.parametrize("tool", ["eat-extract", "eat-tag", "eat-export"])
def test_a_missing_checkpoint_is_a_usage_error(tool: str, env: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The documented convention: 2 for bad arguments, and a --checkpoint that names no file is one (1 is
    for a file that exists but cannot be used); the message names the file, no traceback."""
    from eat_fairseq.cli.export import main as export_main

    missing, audio = str(tmp_path / "nope.pt"), str(env["audio"] / "a.wav")
    argv = {"eat-extract": (extract_main, ["--checkpoint", missing, audio, "--out", str(tmp_path / "o")]),
            "eat-tag": (tag_main, ["--checkpoint", missing, audio]),
            "eat-export": (export_main, [missing, str(tmp_path / "x.onnx")])}
    main, args = argv[tool]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{missing}: no such file" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.onnx").exists()


def test_extract_exit_codes(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "emb"
    broken = env["audio"] / "broken.wav"
    assert extract_main(["--checkpoint", str(env["pre"]), str(broken), str(tmp_path / "missing.wav"), "--out", str(out)]) == 1
    assert len((out / "errors.tsv").read_text().splitlines()) == 3
    a = str(env["audio"] / "a.wav")
    assert extract_main(["--checkpoint", str(env["pre"]), a, a, "--out", str(tmp_path / "o3")]) == 0  # embedded once
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["a.npy"]
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

    assert tag_main(["--checkpoint", str(env["cls"]), str(env["audio"]), "--json", "--top-k", "2"]) == 1  # broken.wav
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
        import eat_fairseq.inference.hear  # noqa: F401
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("RESULT", rc1, rc2, leaked, sorted(set(ATTEMPTS)))
        """
    )
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # nothing but the check above asks for fairseq
    # extract answers 1 because broken.wav failed
    assert "RESULT 1 0 [] ['fairseq']" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.rglob("*.npy")) == ["a.npy", "b.npy", "c.npy"]
    tagged = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert list(tagged["results"]) == [str(env["audio"] / "a.wav")]


# ------------------------------------------------------------------------------------------------
# inputs that used to trap users: collisions, re-runs, manifests without a root, FIFOs, bad options


def test_extract_keeps_input_folders_apart_and_extensions_when_stems_collide(env: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    for sub in ("x", "y"):
        (data / sub).mkdir(parents=True)
        sf.write(data / sub / "clip.wav", tone(0.5, seed=4), 16000)
    sf.write(data / "x" / "clip.flac", tone(0.5, seed=5), 16000)
    out = tmp_path / "emb"
    rc = extract_main(["--checkpoint", str(env["pre"]), str(data / "x"), str(data / "y"), "--out", str(out)])
    assert rc == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == [
        "x/clip.flac.npy", "x/clip.wav.npy", "y/clip.npy"]
    handle = load_model(env["pre"])
    np.testing.assert_allclose(np.load(out / "x" / "clip.flac.npy"), handle.extract(str(data / "x" / "clip.flac")), atol=1e-5)


def test_extract_refuses_to_overwrite_without_force(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = str(env["audio"] / "a.wav")
    out = tmp_path / "emb"
    assert extract_main(["--checkpoint", str(env["pre"]), a, "--out", str(out)]) == 0
    before = (out / "a.npy").read_bytes()
    capsys.readouterr()
    rc = extract_main(["--checkpoint", str(env["pre"]), a, "--out", str(out), "--granularity", "frame"])
    assert rc == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert (out / "a.npy").read_bytes() == before
    assert extract_main(["--checkpoint", str(env["pre"]), a, "--out", str(out / "a.npy")]) == 2  # a file
    assert extract_main(["--checkpoint", str(env["pre"]), a, "--out", str(out), "--granularity", "frame", "--force"]) == 0
    assert np.load(out / "a.npy").ndim == 2


def test_extract_checks_manifests_as_training_does(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_root = tmp_path / "no_root.tsv"
    no_root.write_text("a.wav\t16000\nsub/c.wav\t4800\n")  # the root line is missing
    assert extract_main(["--checkpoint", str(env["pre"]), str(no_root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no_root.tsv" in err and ":1: first line must be the audio root folder" in err
    assert not (tmp_path / "o").exists()


def test_fifo_named_wav_does_not_hang_extract_or_tag(env: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "fifo"
    folder.mkdir()
    sf.write(folder / "good.wav", tone(0.5, seed=6), 16000)
    os.mkfifo(folder / "pipe.wav")
    script = textwrap.dedent(
        f"""
        from eat_fairseq.cli.extract import main as extract_main
        from eat_fairseq.cli.tag import main as tag_main
        rc1 = extract_main(["--checkpoint", {str(env["pre"])!r}, {str(folder)!r}, "--out", {str(tmp_path / "emb")!r}])
        rc2 = tag_main(["--checkpoint", {str(env["cls"])!r}, {str(folder / "pipe.wav")!r}, {str(folder / "good.wav")!r}])
        print("RESULT", rc1, rc2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert "RESULT 1 1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.count("pipe.wav: not a regular file") == 2, proc.stderr
    assert (tmp_path / "emb" / "good.npy").exists()


@pytest.mark.parametrize("main", [extract_main, tag_main], ids=["extract", "tag"])
def test_bad_device_threads_and_batch_size_are_usage_errors(main, env: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--checkpoint", str(env["pre"]), str(env["audio"] / "a.wav")]
    base += ["--out", str(tmp_path / "o")] if main is extract_main else []
    for extra, message in ((["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
                           (["--threads", "0"], "--threads must be >= 1"),
                           (["--batch-size", "0"], "--batch-size must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_threads_option_sets_torch_threads(env: dict[str, Path], tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert extract_main(["--checkpoint", str(env["pre"]), str(env["audio"] / "a.wav"), "--out", str(tmp_path / "o"),
                             "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert tag_main(["--checkpoint", str(env["cls"]), str(env["audio"] / "a.wav"), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_refusal_names_the_cli_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "x": Payload()}, bad)
    sf.write(tmp_path / "a.wav", tone(0.5), 16000)
    assert extract_main(["--checkpoint", str(bad), str(tmp_path / "a.wav"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "--trust-checkpoint" in err and "trusted=True" not in err


def test_extract_reads_packed_shards_and_span_rows(env: dict[str, Path], tmp_path: Path) -> None:
    """A manifest of zip-shard rows, or of span rows, embeds exactly like the loose files it came from."""
    from eat_fairseq.prep.pack import pack_manifests

    loose_dir = tmp_path / "loose"
    loose_dir.mkdir()
    audio = env["audio"]
    (loose_dir / "train.tsv").write_text(f"{audio}\na.wav\t16000\nsub/b.flac\t63945\nsub/c.wav\t4800\n")
    pack_manifests(loose_dir, tmp_path / "packed")
    spans = tmp_path / "spans.tsv"
    spans.write_text(f"{audio}\nsub/b.flac:0:30000\t30000\nsub/b.flac:30000:33945\t33945\n")

    outs = {}
    for name, manifest in (("loose", loose_dir / "train.tsv"), ("packed", tmp_path / "packed" / "train.tsv"),
                           ("spans", spans)):
        out = tmp_path / f"emb_{name}"
        assert extract_main(["--checkpoint", str(env["pre"]), str(manifest), "--out", str(out)]) == 0
        stem = manifest.stem
        outs[name] = (np.load(out / f"{stem}.npz")["utterance"],
                      [r.split("\t")[1] for r in (out / f"{stem}.index.tsv").read_text().splitlines()[1:]])
    assert "zip:" in (tmp_path / "packed" / "train.tsv").read_text()
    np.testing.assert_array_equal(outs["packed"][0], outs["loose"][0])
    assert outs["packed"][1] == outs["loose"][1] == ["a.wav", "sub/b.flac", "sub/c.wav"]  # named after the sources
    assert outs["spans"][1] == ["sub/b@0.flac", "sub/b@30000.flac"]
    handle = load_model(env["pre"])
    wave, sr = sf.read(audio / "sub" / "b.flac", dtype="float32", always_2d=True)
    np.testing.assert_allclose(outs["spans"][0][1], handle.extract(wave[30000:].T, sample_rate=sr), atol=1e-5)
