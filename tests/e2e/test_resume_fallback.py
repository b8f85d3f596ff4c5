"""When training does not resume from checkpoint_last.pt, and what it resumes from instead.

The fallback from checkpoint_last.pt to another checkpoint of the folder is used only with evidence
of an interrupted save (an unreadable checkpoint_last.pt, or temporary files of a save next to a
missing one); it takes the highest update STORED in the files, whatever their times and names, and
refuses a checkpoint saved with another model or task configuration. Without evidence, and always
with checkpoint.no_last_checkpoints=true, a run starts from scratch as fairseq does, and says which
checkpoints it leaves behind. Rules: eat_fairseq/fairseq_ext/checkpoint_io.py.

The runs are tiny (eat_tiny, 2 clips a batch, a few updates): one run makes checkpoint_1_2.pt,
checkpoint_1_4.pt, checkpoint_1_6.pt and checkpoint_last.pt, and each case starts again on a copy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

pytest.importorskip("fairseq")

from helpers import REPO, hydra_train_cmd, json_logs, make_audio_corpus  # noqa: E402

CONFIGS = REPO / "examples" / "pretraining"
SAVED = ["checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_1_6.pt"]
OUR_TEMP = ".checkpoint_last.pt.4242-0123abcd.tmp"  # atomic_write's naming: .NAME.PID-RANDOM.tmp


def _train(data: Path, save: Path, cwd: Path, max_update: int, overrides: Sequence[str] = (),
           env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    cmd = hydra_train_cmd(CONFIGS, "eat_tiny", [
        f"task.data={data}",
        f"checkpoint.save_dir={save}",
        f"optimization.max_update={max_update}",
        "checkpoint.save_interval_updates=2",
        "checkpoint.keep_interval_updates=-1",
        "dataset.batch_size=2",
        "lr_scheduler.warmup_updates=1",
        "common.log_format=json",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        *overrides,
    ])
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


def _first_update(out: str) -> int:
    logs = json_logs(out)
    assert logs, out[-4000:]
    return int(logs[0]["num_updates"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """A run of 6 updates (8 per epoch) with a checkpoint every 2."""
    root = tmp_path_factory.mktemp("resume_fallback")
    data = make_audio_corpus(root / "corpus", num_clips=16)
    save = root / "run"
    proc = _train(data, save, root, max_update=6)
    assert proc.returncode == 0, proc.stdout[-4000:]
    names = sorted(p.name for p in save.iterdir() if p.is_file())
    assert names == sorted(SAVED + ["checkpoint_last.pt"]), names
    return {"data": data, "save": save}


def _copy_run(first_run: Dict[str, Path], dest: Path, names: Sequence[str] = (*SAVED, "checkpoint_last.pt")) -> Path:
    """The run folder copied file by file without timestamps (as ``cp`` without ``-p`` does)."""
    dest.mkdir()
    for name in names:
        shutil.copyfile(first_run["save"] / name, dest / name)
    return dest


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


# ------------------------------------------------------------------------------------ whole runs


def test_copied_folder_resumes_the_highest_stored_update(first_run, tmp_path: Path) -> None:
    """(a) After a copy that lost the timestamps, the oldest checkpoint can look newest; with a damaged
    checkpoint_last.pt the run resumed update 2 although update 6 was intact."""
    save = _copy_run(first_run, tmp_path / "copy")
    now = time.time()
    for age, name in enumerate(SAVED):  # checkpoint_1_2.pt newest, checkpoint_1_6.pt oldest
        os.utime(save / name, (now - 100 * age, now - 100 * age))
    _damage(save / "checkpoint_last.pt")
    proc = _train(first_run["data"], save, tmp_path, max_update=8)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _first_update(proc.stdout) == 7, proc.stdout[-4000:]
    assert "checkpoint_1_6.pt (update 6)" in proc.stdout and "checkpoint_last.pt is unreadable" in proc.stdout


def test_deleted_checkpoint_last_starts_from_scratch_and_names_what_is_left(first_run, tmp_path: Path) -> None:
    """(b) A user who deletes checkpoint_last.pt starts over (fairseq's behaviour); the old rule resumed
    another checkpoint of the old attempt."""
    save = _copy_run(first_run, tmp_path / "copy", SAVED)
    proc = _train(first_run["data"], save, tmp_path, max_update=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _first_update(proc.stdout) == 1, proc.stdout[-4000:]
    warning = next((line for line in proc.stdout.splitlines() if "starting from scratch" in line), "")
    assert all(f"{name} (update {name[-4]})" in warning for name in SAVED), proc.stdout[-4000:]
    assert f"checkpoint.restore_file={save / 'checkpoint_1_6.pt'}" in warning


def test_no_last_checkpoints_never_resumes_by_itself(first_run, tmp_path: Path) -> None:
    """(c) With checkpoint.no_last_checkpoints=true checkpoint_last.pt is never written, and fairseq
    never resumes; the old rule took its absence for an interrupted save at every start. A temporary
    file of a save (a kill) changes nothing: such runs resume only through checkpoint.restore_file."""
    save = _copy_run(first_run, tmp_path / "copy", SAVED)
    (save / OUR_TEMP).write_bytes(b"partial")
    proc = _train(first_run["data"], save, tmp_path, max_update=2,
                  overrides=["checkpoint.no_last_checkpoints=true"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _first_update(proc.stdout) == 1, proc.stdout[-4000:]
    assert "no_last_checkpoints=true" in proc.stdout and "checkpoint_1_6.pt (update 6)" in proc.stdout
    assert not (save / "checkpoint_last.pt").exists() and not (save / OUR_TEMP).exists()


def test_interrupted_first_save_resumes_from_its_checkpoint(first_run, tmp_path: Path) -> None:
    """(d) A kill while the first save of a run copied checkpoint_1_2.pt to checkpoint_last.pt: the
    temporary file left behind is the evidence, and the run resumes update 2."""
    save = _copy_run(first_run, tmp_path / "copy", ["checkpoint_1_2.pt"])
    (save / OUR_TEMP).write_bytes(b"partial")
    proc = _train(first_run["data"], save, tmp_path, max_update=4)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _first_update(proc.stdout) == 3, proc.stdout[-4000:]
    assert "checkpoint_1_2.pt" in proc.stdout and OUR_TEMP in proc.stdout
    assert not (save / OUR_TEMP).exists() and (save / "checkpoint_last.pt").exists()


def test_fallback_with_another_model_config_is_refused(first_run, tmp_path: Path) -> None:
    """(e) The checkpoint to fall back to was saved with another model: stop, naming both files and
    each differing key with its saved and current value, and the way to continue anyway."""
    save = _copy_run(first_run, tmp_path / "copy")
    _damage(save / "checkpoint_last.pt")
    proc = _train(first_run["data"], save, tmp_path, max_update=8,
                  overrides=["model.depth=3", "model.ema_decay=0.99"])
    assert proc.returncode != 0, proc.stdout[-4000:]
    out = proc.stdout
    assert str(save / "checkpoint_last.pt") in out and str(save / "checkpoint_1_6.pt") in out, out[-4000:]
    assert "model.depth: saved 2, now 3" in out and "model.ema_decay: saved 0.999, now 0.99" in out, out[-4000:]
    assert "EAT_RESUME_IGNORE_CONFIG=1" in out and not json_logs(out)


def test_config_check_escape_hatch(first_run, tmp_path: Path) -> None:
    """(e) EAT_RESUME_IGNORE_CONFIG=1 resumes the differing checkpoint, with a warning naming the keys."""
    save = _copy_run(first_run, tmp_path / "copy")
    _damage(save / "checkpoint_last.pt")
    proc = _train(first_run["data"], save, tmp_path, max_update=8, overrides=["model.ema_decay=0.99"],
                  env={"EAT_RESUME_IGNORE_CONFIG": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert _first_update(proc.stdout) == 7, proc.stdout[-4000:]
    assert "model.ema_decay: saved 0.999, now 0.99" in proc.stdout


# ------------------------------------------------------------------------------- the rules alone


def _fake_checkpoint(path: Path, num_updates: Optional[int], depth: int = 2) -> None:
    history = [{"num_updates": num_updates}] if num_updates is not None else []
    cfg = {"model": {"_name": "eat", "depth": depth}, "task": {"_name": "eat_pretraining", "data": "/d"}}
    torch.save({"cfg": cfg, "optimizer_history": history, "model": {"w": torch.zeros(3)}}, path)


def test_candidates_are_ranked_by_the_stored_update(tmp_path: Path) -> None:
    """Neither modification times nor the numbers in the names decide; damaged files and files
    without a stored update come last, named; equal updates by name."""
    from eat_fairseq.fairseq_ext.checkpoint_io import ranked_checkpoints

    stored = {"checkpoint_9_99.pt": 3, "checkpoint_1_2.pt": 35, "checkpoint_best.pt": 35, "checkpoint_1_40.pt": 28,
              "checkpoint_converted.pt": None}
    now = time.time()
    for age, (name, updates) in enumerate(stored.items()):
        _fake_checkpoint(tmp_path / name, updates)
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "checkpoint_2_50.pt").write_bytes(b"truncated")
    ranked = ranked_checkpoints(str(tmp_path))
    assert [(c.name, c.num_updates) for c in ranked if c.problem is None] == [
        ("checkpoint_1_2.pt", 35), ("checkpoint_best.pt", 35), ("checkpoint_1_40.pt", 28), ("checkpoint_9_99.pt", 3)]
    assert [c.name for c in ranked if c.problem is not None] == ["checkpoint_2_50.pt", "checkpoint_converted.pt"]


def test_config_differences() -> None:
    """The model section fully; the task section without the keys a resume may change; the data by
    the folder it names."""
    from omegaconf import OmegaConf

    from eat_fairseq.checkpoints.resume import config_differences

    saved = {"model": {"_name": "eat", "depth": 2, "ema_decay": 0.999, "drop_path_rate": 0.0},
             "task": {"_name": "eat_pretraining", "data": "/data/x", "target_length": 128, "max_update": 6,
                      "num_threads": 1, "probe_data": None, "on_bad_file": "raise", "crop": "start"},
             "optimization": {"lr": [0.1]}}
    same = {"model": dict(saved["model"]),
            "task": dict(saved["task"], data="/data/x/", max_update=100, num_threads=4, probe_data="/p",
                         on_bad_file="skip"),
            "optimization": {"lr": [0.5]}}
    assert config_differences(saved, OmegaConf.create(same)) == []
    other = {"model": dict(saved["model"], depth=1, extra=True),
             "task": dict(saved["task"], data="/data/y", crop="random")}
    assert config_differences(saved, other) == [
        "model.depth: saved 2, now 1",
        "model.extra: saved (absent), now True",
        "task.crop: saved 'start', now 'random'",
        "task.data: saved '/data/x', now '/data/y'",
    ]
    assert config_differences(None, other)  # nothing stored: never silently accepted


def test_a_save_in_progress_leaves_a_marker_until_it_completes(tmp_path: Path) -> None:
    """The marker covers the moment between checkpoint_E_N.pt complete and the copy's own temporary
    file: a kill there left no evidence."""
    from types import SimpleNamespace

    from eat_fairseq.checkpoints.atomic import is_temp_name
    from eat_fairseq.fairseq_ext import checkpoint_io

    checkpoint_io.install()
    seen: List[List[str]] = []

    def fake_save(cfg, trainer, epoch_itr, val_loss):
        seen.append(sorted(os.listdir(tmp_path)))
        if val_loss == "fail":
            raise OSError("disk full")

    cfg = SimpleNamespace(save_dir=str(tmp_path), no_save=False, write_checkpoints_asynchronously=False)
    trainer = SimpleNamespace(checkpoint_suffix="", should_save_checkpoint_on_current_rank=True)
    original = checkpoint_io._ORIGINALS["save_checkpoint"]
    checkpoint_io._ORIGINALS["save_checkpoint"] = fake_save
    try:
        checkpoint_io.save_checkpoint_marked(cfg, trainer, None, None)
        assert len(seen[0]) == 1 and is_temp_name(seen[0][0], checkpoint_io.CHECKPOINT_RE)
        assert os.listdir(tmp_path) == []
        with pytest.raises(OSError):
            checkpoint_io.save_checkpoint_marked(cfg, trainer, None, "fail")
        assert len(os.listdir(tmp_path)) == 1  # the save did not complete: the evidence stays
    finally:
        checkpoint_io._ORIGINALS["save_checkpoint"] = original


def test_other_ranks_take_rank_zeros_decision(tmp_path: Path, monkeypatch) -> None:
    """Only data-parallel rank 0 looks at the folder (and removes the temporary files that are the
    evidence); the others resume what it broadcasts, so no two ranks resume different files."""
    from types import SimpleNamespace

    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    from eat_fairseq.fairseq_ext import checkpoint_io

    checkpoint_io.install()
    (tmp_path / OUR_TEMP).write_bytes(b"partial")
    decided = {"restore_file": str(tmp_path / "checkpoint_1_2.pt"), "error": None}
    monkeypatch.setattr(distributed_utils, "broadcast_object", lambda obj, src_rank, group, dist_device: decided)
    loaded = []
    monkeypatch.setitem(checkpoint_io._ORIGINALS, "load_checkpoint", lambda cfg, trainer: loaded.append(cfg))
    cfg = OmegaConf.create({"save_dir": str(tmp_path), "restore_file": "checkpoint_last.pt",
                            "finetune_from_model": None, "no_last_checkpoints": False})
    trainer = SimpleNamespace(data_parallel_rank=1, data_parallel_world_size=2, data_parallel_process_group=None,
                              device=torch.device("cpu"), checkpoint_suffix="")
    checkpoint_io.load_checkpoint_with_fallback(cfg, trainer)
    assert loaded[0].restore_file == decided["restore_file"] and (tmp_path / OUR_TEMP).exists()
