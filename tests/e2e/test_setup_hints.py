"""Set-up mistakes of a new user end in one line that names them (issue 23, item 3).

On 057a056: a forgotten ``common.user_dir`` gave fairseq's ``AssertionError: Could not infer task type``;
``+optimization.max_updates=20`` (a typo of ``max_update``) was silently ignored; a mistyped ``task.data``
reported a missing ``label_descriptors.csv``; ``audio_folder.py`` on an empty folder left empty ``.tsv``
files, so the next run needed ``--force``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BIN, REPO, make_audio_corpus, run

pytestmark = pytest.mark.fairseq

PRETRAINING, FINETUNING = REPO / "examples" / "pretraining", REPO / "examples" / "finetuning"


def _train(config_dir: Path, name: str, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """fairseq-hydra-train exactly as a user types it: no common.user_dir unless ``overrides`` has one."""
    exe = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    return subprocess.run([exe, "--config-dir", str(config_dir), "--config-name", name, *overrides], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_audio_corpus(tmp_path_factory.mktemp("hints"), num_clips=8)  # -> .../manifests


def test_a_run_without_common_user_dir_trains(data: Path, tmp_path: Path) -> None:
    proc = _train(PRETRAINING, "eat_tiny", [f"task.data={data}", "optimization.max_update=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Could not infer task type" not in proc.stdout
    import eat_fairseq

    assert f"common.user_dir not given; using {eat_fairseq.USER_DIR}" in proc.stdout
    assert (tmp_path / "checkpoints" / "eat_tiny" / "checkpoint_last.pt").exists()


def test_a_misspelt_plus_key_stops_the_run_naming_the_key_and_the_right_one(data: Path, tmp_path: Path) -> None:
    proc = _train(PRETRAINING, "eat_tiny", [f"task.data={data}", "+optimization.max_updates=2"], tmp_path)
    assert proc.returncode != 0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("eat_fairseq.fairseq_ext.setup_checks.")), "")
    assert "optimization.max_updates is not a setting of this run" in line and "did you mean optimization.max_update?" in line, proc.stdout[-3000:]
    assert not list(tmp_path.rglob("*.pt"))  # stopped before the first update


def test_a_mistyped_data_folder_is_named_with_the_closest_folder(data: Path, tmp_path: Path) -> None:
    typo = data.parent / "manifets"
    proc = _train(FINETUNING, "folder_cpu", [f"task.data={typo}", f"common.user_dir={REPO / 'eat_fairseq'}"],
                  tmp_path)
    assert proc.returncode != 0
    error = next((x for x in proc.stdout.splitlines() if x.startswith("FileNotFoundError")), "")
    assert f"the folder {typo} does not exist (did you mean {data}?)" in error, proc.stdout[-3000:]


def test_a_manifest_run_that_finds_no_audio_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    script = [sys.executable, str(REPO / "manifests" / "audio_folder.py")]
    proc = subprocess.run([*script, str(tmp_path / "empty"), "--dest", str(tmp_path / "m")], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1 and "nothing was written" in proc.stdout, proc.stdout
    assert not (tmp_path / "m").exists()
    make_audio_corpus(tmp_path / "empty", num_clips=4)  # the user adds audio and runs it again: no --force needed
    shutil.rmtree(tmp_path / "empty" / "manifests")
    run([*script, str(tmp_path / "empty"), "--dest", str(tmp_path / "m")], cwd=tmp_path)
    assert (tmp_path / "m" / "train.tsv").read_text().count("\n") > 1
