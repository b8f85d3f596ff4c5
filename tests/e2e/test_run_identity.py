"""A run remembers what it was trained on (issue 23): resuming a run folder with other data or other
model/task settings stops with a message naming both and the ways on; a run that already reached
``max_update`` says so."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

from helpers import REPO, hydra_train_cmd, make_audio_corpus, run  # noqa: E402

CONFIGS = REPO / "examples" / "pretraining"


def train(data: Path, save: Path, max_update: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = hydra_train_cmd(CONFIGS, "eat_tiny", [f"task.data={data}", f"checkpoint.save_dir={save}",
                                                f"optimization.max_update={max_update}", "dataset.batch_size=4", *extra])
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=save.parent, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("identity")
    data = make_audio_corpus(root / "a", num_clips=8)
    save = root / "run"
    run(hydra_train_cmd(CONFIGS, "eat_tiny", [f"task.data={data}", f"checkpoint.save_dir={save}",
                                              "optimization.max_update=3", "dataset.batch_size=4"]), cwd=root)
    return data, save


def test_other_data_in_the_same_run_folder_is_refused(first_run, tmp_path: Path) -> None:
    data, save = first_run
    other = make_audio_corpus(tmp_path / "b", num_clips=6, seed=5)
    proc = train(other, save, 6)
    assert proc.returncode != 0
    out = proc.stdout
    assert "was saved by a run that differs from this one" in out, out[-3000:]
    assert f"{data}/train.tsv (8 rows" in out and f"{other}/train.tsv (6 rows" in out
    assert "checkpoint.save_dir" in out and "EAT_RESUME_IGNORE_CONFIG=1" in out
    assert "dataloader mismatch" not in out and "done training" not in out


def test_rewritten_manifest_and_other_settings_are_refused(first_run, tmp_path: Path) -> None:
    data, save = first_run
    copy = tmp_path / "data"
    copy.mkdir()
    lines = (data / "train.tsv").read_text().splitlines()
    (copy / "train.tsv").write_text("\n".join(lines[:-1]) + "\n")  # same folder of audio, one row fewer
    out = train(copy, save, 6).stdout
    assert "training data: saved" in out and "(7 rows" in out, out[-3000:]
    out = train(data, save, 6, "model.decoder_depth=1").stdout
    assert "model.decoder_depth: saved 2, now 1" in out, out[-3000:]


def test_the_same_rows_moved_elsewhere_resume(first_run, tmp_path: Path) -> None:
    """The rows decide, not the folder's name: manifests rewritten for a new root are the same data."""
    data, save = first_run
    moved = tmp_path / "moved"
    moved.mkdir()
    lines = (data / "train.tsv").read_text().splitlines()
    (moved / "train.tsv").write_text("\n".join(lines) + "\n")
    proc = train(moved, save, 3)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "already reached update 3" in proc.stdout and "optimization.max_update=3" in proc.stdout


def test_explicit_override_continues(first_run, tmp_path: Path) -> None:
    data, save = first_run
    other = make_audio_corpus(tmp_path / "c", num_clips=6, seed=9)
    proc = train(other, save, 3, env={"EAT_RESUME_IGNORE_CONFIG": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "EAT_RESUME_IGNORE_CONFIG=1: continuing" in proc.stdout
