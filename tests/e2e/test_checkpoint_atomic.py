"""Checkpoints appear atomically; a run killed during a save resumes; a damaged checkpoint_last.pt
falls back to the intact checkpoint with the highest stored update (the rules of that fallback:
test_resume_fallback.py); a failed write leaves no temporary file behind."""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

pytest.importorskip("fairseq")

import eat_fairseq  # noqa: E402,F401  (registers the eat_* components; patches nothing yet)
from eat_fairseq.checkpoints.atomic import atomic_write, is_temp_name, remove_stale_temps, temp_name  # noqa: E402
from eat_fairseq.fairseq_ext import checkpoint_io  # noqa: E402
from helpers import REPO, hydra_train_cmd, json_logs, make_audio_corpus  # noqa: E402

CONFIGS = REPO / "examples" / "pretraining"


def _temps(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------- unit tests


def test_patches_come_with_an_eat_task_not_with_the_import(tmp_path: Path) -> None:
    """Importing the package leaves fairseq's checkpoint functions alone (other tasks in the process keep
    fairseq's own); setting up an eat_* task for training installs them."""
    script = f"""
import eat_fairseq.fairseq_ext
from fairseq import checkpoint_utils
from omegaconf import OmegaConf
before = checkpoint_utils.load_checkpoint.__module__
from eat_fairseq.fairseq_ext.tasks import EATPretrainingTask, EATPretrainingTaskConfig
cfg = OmegaConf.structured(EATPretrainingTaskConfig(data={str(tmp_path)!r}, max_update=1, train_subset="train",
                           clone_batch=1, mask_prob=0.8, mask_length=5, mask_prob_adjust=0.07, patch_size=16, seed=1))
EATPretrainingTask.setup_task(cfg, from_checkpoint=True)
during_load = checkpoint_utils.load_checkpoint.__module__
EATPretrainingTask.setup_task(cfg)
print(before, during_load, checkpoint_utils.load_checkpoint.__module__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fairseq.checkpoint_utils", "fairseq.checkpoint_utils", "eat_fairseq.fairseq_ext.checkpoint_io"]


@pytest.fixture(autouse=True)
def patched() -> None:
    """The state of a training process: an eat_* task was set up (see the test above)."""
    checkpoint_io.install()


def test_disk_full_during_save_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    from fairseq import checkpoint_utils

    target = tmp_path / "checkpoint_last.pt"
    checkpoint_utils.torch_persistent_save({"w": torch.ones(3)}, str(target))
    assert torch.equal(torch.load(target)["w"], torch.ones(3))

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_utils.torch_persistent_save({"w": torch.zeros(3)}, str(target))
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["w"], torch.ones(3))  # the old checkpoint is untouched
    assert _temps(tmp_path) == []


def test_copy_to_checkpoint_last_is_atomic(tmp_path: Path, monkeypatch) -> None:
    from fairseq import checkpoint_utils

    src, dst = tmp_path / "checkpoint_1_5.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"w": torch.ones(4)}, src)
    dst.write_bytes(b"old")

    def full_disk(source, out, length=0):
        out.write(source.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    with pytest.raises(OSError):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    monkeypatch.undo()
    assert dst.read_bytes() == b"old" and _temps(tmp_path) == []
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert torch.equal(torch.load(dst)["w"], torch.ones(4))


def test_atomic_write_cleans_up_on_interrupt(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"

    def interrupted(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), interrupted)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_stale_temps_are_recognised_and_removed(tmp_path: Path) -> None:
    ours = Path(temp_name(str(tmp_path / "checkpoint_last.pt"))).name
    names = [ours, "checkpoint_1_4.pt.tmp", "checkpoint_last.pt", "notes.tmp", "checkpoint_1_4.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert is_temp_name(ours, checkpoint_io.CHECKPOINT_RE) and not is_temp_name("notes.tmp", checkpoint_io.CHECKPOINT_RE)
    removed = remove_stale_temps(str(tmp_path), checkpoint_io.CHECKPOINT_RE)
    assert sorted(removed) == sorted([ours, "checkpoint_1_4.pt.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_4.pt", "checkpoint_last.pt", "notes.tmp"]


def test_checkpoint_problem_detects_truncation(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good)
    assert checkpoint_io.checkpoint_problem(str(good)) is None
    data = good.read_bytes()
    for n in (0, 100, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"bad{n}.pt"
        bad.write_bytes(data[:n])
        assert checkpoint_io.checkpoint_problem(str(bad)) is not None, n


# ------------------------------------------------------------------------------ kill a real training

# A model small to run but with a large checkpoint (~135 MB with the teacher and Adam's moments), so
# that writing and copying it takes long enough for a kill to land inside.
BIG_MODEL = ["model.embed_dim=384", "model.depth=4", "model.num_heads=6", "model.decoder_dim=64"]


def _train_cmd(data: Path, save: Path, max_update: int) -> List[str]:
    return hydra_train_cmd(CONFIGS, "eat_tiny", [
        f"task.data={data}",
        f"checkpoint.save_dir={save}",
        f"optimization.max_update={max_update}",
        "checkpoint.save_interval_updates=1",
        "checkpoint.keep_interval_updates=1",
        "dataset.batch_size=2",
        "common.log_format=json",
        "common.log_interval=1",
        *BIG_MODEL,
    ])


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def _kill_during_save(cmd: List[str], cwd: Path, delay: float) -> str:
    """Start training; once it has written checkpoint_1_N.pt and starts copying it to
    checkpoint_last.pt, wait ``delay`` seconds and SIGKILL it. Returns its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Finished saving checkpoint to" in line and "checkpoint_last" not in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        rest = proc.communicate(timeout=60)[0] or ""
    out = "".join(lines) + rest
    assert proc.returncode == -signal.SIGKILL, f"training ended by itself ({proc.returncode}):\n{out[-4000:]}"
    return out


def _assert_all_intact(save: Path) -> None:
    for path in sorted(save.glob("checkpoint*.pt")):
        problem = checkpoint_io.checkpoint_problem(str(path))
        assert problem is None, f"{path.name}: {problem}"
        state = torch.load(path, map_location="cpu")  # the real load a resume does
        assert "model" in state and "extra_state" in state, path.name


def _kill_trials(tmp_path: Path, delays: List[float]) -> None:
    data = make_audio_corpus(tmp_path / "corpus", num_clips=40)  # 20 updates per epoch: mid-epoch saves
    save = tmp_path / "ckpt"
    cmd = _train_cmd(data, save, max_update=10_000)
    for trial, delay in enumerate(delays):
        had_checkpoint = any(save.glob("checkpoint*.pt")) if save.exists() else False
        out = _kill_during_save(cmd, tmp_path, delay)
        if had_checkpoint:
            # the killed process had resumed the previous one (not started over)
            assert "Loaded checkpoint" in out, f"trial {trial}: did not resume:\n{out[-4000:]}"
        _assert_all_intact(save)

    # checkpoint_last.pt damaged (as an older version's copy left it): resume from the newest
    # intact checkpoint with a clear warning, train to the end, leave no temporary file
    last = save / "checkpoint_last.pt"
    interval = sorted(save.glob("checkpoint_*_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    assert interval, "no interval checkpoint to fall back to"
    newest = interval[-1]
    fallback_updates = int(newest.stem.split("_")[-1])
    if last.exists():
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    # what a kill inside torch.save leaves (ours and fairseq's naming): removed at the next start
    stale = [Path(temp_name(str(last))).name, f"{newest.name}.tmp"]
    for name in stale:
        (save / name).write_bytes(b"partial")
    proc = subprocess.run(_train_cmd(data, save, max_update=fallback_updates + 2), cwd=tmp_path,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from the checkpoint with the highest stored update instead" in out and newest.name in out, out[-4000:]
    assert "temporary file(s) of an interrupted checkpoint save" in out and all(n in out for n in stale)
    first = int(json_logs(out)[0]["num_updates"])
    assert first == fallback_updates + 1, (first, fallback_updates)
    _assert_all_intact(save)
    assert _temps(save) == []


def test_kill_during_save_then_resume(tmp_path: Path) -> None:
    """Three SIGKILLs: after the first save is complete, then as the copy to checkpoint_last.pt
    starts and 10 ms into it (fairseq's plain copy left a 0-byte or truncated file there, and the
    next start failed with EOFError / PytorchStreamReader errors); then a damaged checkpoint_last.pt.
    The many-kill version is marked slow."""
    _kill_trials(tmp_path, [0.3, 0.0, 0.01])


@pytest.mark.slow
def test_kill_during_save_many_trials(tmp_path: Path) -> None:
    rng = random.Random(0)
    _kill_trials(tmp_path, [rng.uniform(0.0, 0.3) for _ in range(20)])
