"""pack --force never destroys its own input or the old outputs before the new ones are complete, and a
failed registration of the eat_* fairseq components fails the fairseq run with its cause (issue 20, item 5).

pack: rows inside the destination are refused up front; a run that fails mid-way leaves the old shards
and manifests as they were and no working folder; a working folder left by a killed run is reported
(removed with --force); a successful --force re-pack replaces the outputs, the old ones staying readable
until the new ones are complete. Registration: with fairseq loaded first (``common.user_dir``), a broken
fairseq layer makes ``import eat_fairseq`` raise, naming the module and chaining the cause, instead of
fairseq's "Could not infer task type" later on.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import eat_fairseq
from eat_fairseq.prep import pack
from eat_fairseq.prep.pack import main, pack_manifests
from helpers import BIN, REPO, make_audio_corpus

PACK_ARGS = ["--shard-size", "20KB", "--workers", "1", "--quiet"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (recursively) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _working_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".pack-tmp" in p.name)


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, Path]:
    """A small loose corpus (6 clips, four 20 kB shards) and its packed copy: (manifests, packed)."""
    manifests = make_audio_corpus(tmp_path / "corpus", num_clips=6, seconds=0.25)
    dest = tmp_path / "packed"
    assert main([str(manifests), "--dest", str(dest), *PACK_ARGS]) == 0
    assert len(list(dest.glob("shard_*.zip"))) >= 3
    return manifests, dest


def test_force_into_the_folder_holding_the_sources_is_refused_and_the_data_stays(packed, tmp_path, capsys) -> None:
    """Re-packing packed rows into their own folder (directly, through a symlink, or loose audio into its
    own folder) is refused with one line naming the row, whatever --force says; nothing changes."""
    manifests, dest = packed
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(dest / "train.tsv", again / "train.tsv")  # rows point into dest's shards
    (tmp_path / "link").symlink_to(dest, target_is_directory=True)
    audio = tmp_path / "corpus" / "audio"
    before, audio_before = _snapshot(dest), _snapshot(audio)
    for source, target in ((again, dest), (again, tmp_path / "link"), (manifests, audio)):
        capsys.readouterr()
        assert main([str(source), "--dest", str(target), "--force", *PACK_ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lies inside --dest" in err, err
        assert f"{source / 'train.tsv'}:2:" in err, err  # the offending manifest row
    assert _snapshot(dest) == before and _snapshot(audio) == audio_before
    assert _working_folders(tmp_path) == [] and _working_folders(tmp_path / "corpus") == []


def test_failure_mid_way_leaves_the_old_outputs_and_no_working_folder(packed, tmp_path, monkeypatch) -> None:
    """The second pack dies while writing its second shard: the first pack's shards and manifests are
    exactly as they were and no working folder is left beside them."""
    manifests, dest = packed
    before = _snapshot(dest)
    real_member_bytes = pack._member_bytes
    calls = []

    def failing(src, flac):
        calls.append(src.name)
        if len(calls) > 3:
            raise OSError("simulated read error half-way through the pack")
        return real_member_bytes(src, flac)

    monkeypatch.setattr(pack, "_member_bytes", failing)
    with pytest.raises(OSError, match="simulated read error"):
        pack_manifests(manifests, dest, shard_size=20_000, force=True)
    assert len(calls) == 4
    assert _snapshot(dest) == before
    assert _working_folders(tmp_path) == []


def test_working_folder_of_a_killed_run_is_reported_then_removed_with_force(packed, tmp_path, capsys) -> None:
    manifests, _ = packed
    killed = tmp_path / ".fresh.pack-tmp-999-deadbeef"  # what a SIGKILLed run into `fresh` leaves
    killed.mkdir()
    (killed / "shard_000.zip").write_bytes(b"half a shard")
    capsys.readouterr()
    assert main([str(manifests), "--dest", str(tmp_path / "fresh"), *PACK_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(killed) in err and "--force" in err, err
    assert killed.is_dir() and not (tmp_path / "fresh").exists()
    assert main([str(manifests), "--dest", str(tmp_path / "fresh"), "--force", *PACK_ARGS]) == 0
    assert f"removed {killed}" in capsys.readouterr().out
    assert _working_folders(tmp_path) == [] and (tmp_path / "fresh" / "train.tsv").is_file()


def test_successful_force_repack_replaces_the_outputs_after_they_are_complete(packed, tmp_path, monkeypatch) -> None:
    """A --force re-pack (other audio, one shard instead of several) gives exactly what a pack into a new
    folder gives (stale shards removed, a foreign file kept), and while its shards are being written the
    old shards and manifests are still there, unchanged."""
    _, dest = packed
    (dest / "NOTES.txt").write_text("the user's own file\n")
    before = _snapshot(dest)
    other = make_audio_corpus(tmp_path / "other", num_clips=3, seconds=0.2, seed=1)
    fresh = tmp_path / "fresh"
    assert main([str(other), "--dest", str(fresh), "--shard-size", "1GB", "--workers", "1", "--quiet"]) == 0

    seen_during_writing = []
    real_write_shard = pack._write_shard

    def watching(job):
        seen_during_writing.append(_snapshot(dest) == before)
        return real_write_shard(job)

    monkeypatch.setattr(pack, "_write_shard", watching)
    report = pack_manifests(other, dest, shard_size=10**9, force=True)
    assert seen_during_writing == [True]
    after, expected = _snapshot(dest), _snapshot(fresh)
    assert after.pop("NOTES.txt") == b"the user's own file\n"
    assert sorted(after) == sorted(expected) == ["shard_000.zip", "train.tsv", "valid.tsv"]
    assert after["shard_000.zip"] == expected["shard_000.zip"]
    for name in ("train.tsv", "valid.tsv"):  # line 1 is the manifest's own folder
        assert after[name].split(b"\n", 1) == [os.fsencode(str(dest)), expected[name].split(b"\n", 1)[1]]
    assert report.shards == 1 and report.members == 3
    assert _working_folders(tmp_path) == []


def _broken_user_dir(tmp_path: Path) -> tuple[Path, str]:
    """A copy of this package whose module registering the eat_classification task raises at import."""
    user_dir = tmp_path / "user" / "eat_fairseq"
    shutil.copytree(eat_fairseq.USER_DIR, user_dir, ignore=shutil.ignore_patterns("__pycache__"))
    task_module = next(p for p in sorted((user_dir / "fairseq_ext").glob("*.py"))
                       if '@register_task("eat_classification"' in p.read_text())
    text = task_module.read_text()
    head = "from __future__ import annotations\n"
    assert head in text
    task_module.write_text(text.replace(head, head + 'raise RuntimeError("simulated bug in the task module")\n', 1))
    return user_dir, f"eat_fairseq.fairseq_ext.{task_module.stem}"


@pytest.mark.fairseq
@pytest.mark.skipif(importlib.util.find_spec("fairseq") is None, reason="needs fairseq")
def test_hydra_train_with_a_broken_user_dir_fails_with_the_cause_not_unknown_task(tmp_path) -> None:
    user_dir, module = _broken_user_dir(tmp_path)
    exe = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    cmd = [exe, "--config-dir", str(REPO / "examples" / "finetuning"), "--config-name", "tiny",
           f"common.user_dir={user_dir}", f"task.data={tmp_path}", f"checkpoint.save_dir={tmp_path / 'save'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "Could not infer task type" not in err, err[-3000:]
    assert f"failed in {module}" in err, err[-3000:]  # the message names the module that broke
    assert "\nRuntimeError: simulated bug in the task module\n" in err, err[-3000:]  # the chained cause


def test_import_after_fairseq_raises_when_registration_fails(tmp_path) -> None:
    """fairseq loaded first (a stand-in here, so no real fairseq is needed and it is fast): the fairseq
    layer cannot import from it, so `import eat_fairseq` raises an ImportError chained to the cause."""
    fake = tmp_path / "fairseq"
    fake.mkdir()
    (fake / "__init__.py").write_text("VALUE = 42\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import fairseq
        try:
            import eat_fairseq
        except ImportError as exc:
            assert exc.__cause__ is not None, "the cause must be chained"
            print("CAUSE", type(exc.__cause__).__name__)
            raise
        """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    assert "CAUSE" in proc.stdout and "registering the eat_* fairseq components failed in eat_fairseq." in proc.stderr
    assert "The above exception was the direct cause of the following exception" in proc.stderr
