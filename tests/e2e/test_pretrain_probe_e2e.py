"""The online probe and live diagnostics of pre-training, through fairseq-hydra-train.

The probe must only observe: a run with it has the same weights as a run without, and a resumed run
with it equals a straight run without it. (A probe that touches the weights fails this test; one that
draws torch random numbers would not, because fairseq reseeds torch at every update, so the random
number generators are checked in test_probe.py::test_online_probe_only_observes and, for the set-up,
in test_online_probe.py.) With two processes, rank 0 probes while rank 1 waits at the probe's barrier;
a broken probe set stops both before the first update.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

from helpers import DDP_CPU_OVERRIDES, REPO, hydra_train_cmd, json_logs, make_audio_corpus, run  # noqa: E402
from test_probe import write_tone_folder  # noqa: E402

CONFIGS = REPO / "examples" / "pretraining"


def overrides(data: Path, save: Path, max_update: int, probe: Path | None, interval: int = 3) -> list[str]:
    out = [f"task.data={data}", f"checkpoint.save_dir={save}", f"optimization.max_update={max_update}",
           "common.log_format=json", "common.log_interval=1", "dataset.batch_size=4",
           "task.diagnostics_interval_updates=2"]
    if probe is not None:
        out += [f"task.probe_data={probe}", f"task.probe_interval_updates={interval}"]
    return out


def load_model_state(path: Path) -> dict:
    import eat_fairseq  # noqa: F401  (installs the checkpoint allow-list)

    return torch.load(path, map_location="cpu")["model"]


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_online_probe_changes_nothing_and_resumes_exactly(tmp_path: Path) -> None:
    data = make_audio_corpus(tmp_path / "corpus", num_clips=12)
    probe = write_tone_folder(tmp_path / "probe", splits=2, per_class=3)

    plain, split = tmp_path / "plain", tmp_path / "split"
    run(hydra_train_cmd(CONFIGS, "eat_tiny", overrides(data, plain, 6, None)), cwd=tmp_path)
    # with the probe on: 4 updates, stop, resume to 6 == 6 straight without the probe
    out = run(hydra_train_cmd(CONFIGS, "eat_tiny", overrides(data, split, 4, probe)), cwd=tmp_path)
    logs = json_logs(out)
    assert [int(s["num_updates"]) for s in logs] == [1, 2, 3, 4]
    assert "probe_student_logreg" not in logs[1] and "probe_teacher_knn" in logs[2]  # from update 3 on
    assert "probe at update 3" in out and "probe at update 4" in out  # every 3 updates and at max_update
    for key in ("pos_share", "student_spread", "cls_spread", "utterance_term", "grad_frame", "grad_utterance",
                "grad_utt_share"):
        assert key in logs[-1], key
    last = logs[-1]
    # loss = frame term + weighted utterance term
    assert abs(float(last["loss"]) - float(last["frame_loss"]) - float(last["utterance_term"])) < 1e-2
    assert 0.0 <= float(last["grad_utt_share"]) <= 1.0 and 0.0 <= float(last["pos_share"]) <= 1.0

    out = run(hydra_train_cmd(CONFIGS, "eat_tiny", overrides(data, split, 6, probe)), cwd=tmp_path)
    assert "Loaded checkpoint" in out and "probe at update 6" in out
    assert_same(load_model_state(plain / "checkpoint_last.pt"), load_model_state(split / "checkpoint_last.pt"))


def _torchrun() -> str:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    return torchrun


def _two_process_cmd(data: Path, save: Path, max_update: int, probe: Path | None) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = hydra_train_cmd(CONFIGS, "eat_tiny", [*overrides(data, save, max_update, probe, interval=2),
                                                *DDP_CPU_OVERRIDES])
    return [_torchrun(), "--nproc_per_node=2", f"--master_port={port}", *cmd]


def test_two_processes_probe_stop_and_resume(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes, a probe every 2 updates: stopped at update 3 and resumed to 5, every
    probe is logged (before and after the resume), and the weights equal those of a straight 2-process
    run without the probe."""
    data = make_audio_corpus(tmp_path / "corpus", num_clips=12)
    probe = write_tone_folder(tmp_path / "probe", splits=2, per_class=3)
    env = {"OMP_NUM_THREADS": "1"}
    plain, split = tmp_path / "plain", tmp_path / "split"
    out = run(_two_process_cmd(data, split, 3, probe), cwd=tmp_path, env=env, timeout=300)
    assert "probe set" in out and "s per probe" in out  # checked, loaded and timed at set-up
    assert "probe at update 2" in out and "probe at update 3" in out
    assert "probe_student_logreg" in json_logs(out)[-1]
    out = run(_two_process_cmd(data, split, 5, probe), cwd=tmp_path, env=env, timeout=300)
    assert "Loaded checkpoint" in out and "probe at update 4" in out and "probe at update 5" in out
    logs = json_logs(out)
    assert [int(s["num_updates"]) for s in logs] == [4, 5] and "probe_teacher_knn" in logs[-1]
    run(_two_process_cmd(data, plain, 5, None), cwd=tmp_path, env=env, timeout=300)
    assert_same(load_model_state(plain / "checkpoint_last.pt"), load_model_state(split / "checkpoint_last.pt"))


def test_two_processes_stop_together_on_a_broken_probe_set(tmp_path: Path) -> None:
    """A label line rank 0 cannot parse stops both processes at set-up, before the first update."""
    data = make_audio_corpus(tmp_path / "corpus", num_clips=4)
    probe = write_tone_folder(tmp_path / "probe", splits=2, per_class=2)
    lbl = probe / "split1.lbl"
    lbl.write_text(lbl.read_text().replace("\thigh", "\thgih", 1))
    proc = subprocess.run(_two_process_cmd(data, tmp_path / "save", 3, probe), cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    assert "split1.lbl:3: unknown label 'hgih'" in proc.stdout, proc.stdout[-4000:]
    assert "(checked on rank 0)" in proc.stdout, proc.stdout[-4000:]  # rank 1 stops with rank 0's line
    assert not json_logs(proc.stdout)  # not a single update
