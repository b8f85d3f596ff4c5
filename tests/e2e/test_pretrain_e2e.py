"""End-to-end pre-training through fairseq-hydra-train: train, load in a fresh process, resume, distributed."""
from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

from helpers import DDP_CPU_OVERRIDES, REPO, hydra_train_cmd, json_logs, make_audio_corpus, run  # noqa: E402

CONFIGS = REPO / "examples" / "pretraining"


def tiny_overrides(data: Path, save_dir: Path, max_update: int, extra: tuple = ()) -> list:
    return [
        f"task.data={data}",
        f"checkpoint.save_dir={save_dir}",
        f"optimization.max_update={max_update}",
        "common.log_format=json",
        "common.log_interval=1",
        "dataset.batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_audio_corpus(tmp_path_factory.mktemp("corpus"), num_clips=12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_state(path: Path) -> dict:
    import eat_fairseq  # noqa: F401  (installs the checkpoint allow-list)

    return torch.load(path, map_location="cpu")


def test_train_load_extract_in_fresh_process(data: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    out = run(hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, save, 4)), cwd=tmp_path)
    logs = json_logs(out)
    assert [int(s["num_updates"]) for s in logs] == [1, 2, 3, 4]
    for key in ("loss", "frame_loss", "utterance_loss", "target_var", "pred_var", "ema_decay", "masked_pct"):
        assert key in logs[-1], key
    assert abs(float(logs[0]["masked_pct"]) - (64 - 12) / 64) < 1e-4  # 128 frames -> 8x8 grid, 12 visible
    ckpt = save / "checkpoint_last.pt"
    assert ckpt.exists()
    # a fresh interpreter: only `import eat_fairseq`, then fairseq's own loader
    script = f"""
import torch, eat_fairseq
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([{str(ckpt)!r}])
m = models[0].eval()
x = m.extract_features(torch.zeros(2, 1, 256, 128))
assert tuple(x.shape) == (2, 1 + 16 * 8, 64), x.shape
assert type(task).__name__ == "EATPretrainingTask"
print("OK", int(m.num_ema_updates))
"""
    result = run([sys.executable, "-c", script], cwd=tmp_path)
    assert "OK 4" in result


def test_resume_is_exact(data: Path, tmp_path: Path) -> None:
    """8 updates straight == 5 updates, stop, resume to 8: same weights, teacher, lr and EMA count."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, straight, 8)), cwd=tmp_path)
    run(hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, split, 5)), cwd=tmp_path)
    out = run(hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, split, 8)), cwd=tmp_path)
    assert "Loaded checkpoint" in out
    assert [int(s["num_updates"]) for s in json_logs(out)] == [6, 7, 8]

    a = load_state(straight / "checkpoint_last.pt")
    b = load_state(split / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 8
    assert a["model"]["num_ema_updates"].item() == b["model"]["num_ema_updates"].item() == 8
    assert set(a["model"]) == set(b["model"])
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-6, msg=name)
    assert any(k.startswith("teacher.") for k in a["model"])
    lr_a = a["optimizer_history"][-1]["lr_scheduler_state"]
    lr_b = b["optimizer_history"][-1]["lr_scheduler_state"]
    assert lr_a == lr_b


def test_distributed_two_process_cpu(data: Path, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes: one model trained on both (batch summed across workers), then resume."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    save = tmp_path / "ddp"
    dist = DDP_CPU_OVERRIDES

    def launch(max_update: int) -> str:
        cmd = hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, save, max_update, dist))
        return run(
            [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", *cmd],
            cwd=tmp_path,
            env={"OMP_NUM_THREADS": "1"},
            timeout=300,
        )

    out = launch(3)
    logs = json_logs(out)
    assert logs, out[-3000:]
    # each worker draws 4 clips; the logged batch size is summed over both workers
    assert float(logs[0]["bsz"]) == 8.0, logs[0]
    assert "distributed init (rank 1)" in out or "rank 1" in out
    out = launch(5)
    assert "Loaded checkpoint" in out
    assert [int(s["num_updates"]) for s in json_logs(out)][-1] == 5
    state = load_state(save / "checkpoint_last.pt")
    assert state["model"]["num_ema_updates"].item() == 5


def test_bf16_keeps_an_fp32_teacher(data: Path, tmp_path: Path) -> None:
    """common.bf16 casts the model; the EMA teacher stays fp32 with an exact position table."""
    from eat_fairseq.model.encoder import sincos_pos_embed_2d

    save = tmp_path / "bf16"
    out = run(hydra_train_cmd(CONFIGS, "eat_tiny", tiny_overrides(data, save, 3, ("common.bf16=true",))), cwd=tmp_path)
    assert [int(s["num_updates"]) for s in json_logs(out)] == [1, 2, 3]
    model = load_state(save / "checkpoint_last.pt")["model"]
    teacher = {k: v for k, v in model.items() if k.startswith("teacher.")}
    assert teacher and all(v.dtype == torch.float32 for v in teacher.values())
    # fairseq saves every tensor as fp32 (move_to_cpu), but the student trained in bf16: its
    # position table holds bf16-rounded values, the teacher's the exact ones
    table = sincos_pos_embed_2d(64, 768, 8).unsqueeze(0)
    assert torch.equal(model["teacher.pos_embed"], table)
    assert not torch.equal(model["encoder.pos_embed"], table)
    assert torch.equal(model["encoder.pos_embed"], table.bfloat16().float())


def test_a_resume_restarts_the_stopped_wall_stopwatch() -> None:
    """A mid-epoch resume loads fairseq's metrics, which leaves ``wall`` stopped (every later log line
    said wall=0); the eat tasks' begin_epoch starts it again and leaves a running one alone."""
    from fairseq.logging import metrics

    from eat_fairseq.fairseq_ext.tasks import EATClassificationTask
    from eat_fairseq.fairseq_ext.tasks import EATPretrainingTask

    try:
        for task_class in (EATPretrainingTask, EATClassificationTask):
            metrics.reset()
            metrics.log_start_time("wall", priority=790, round=0)  # what the trainer does at start
            saved = metrics.state_dict()  # what a checkpoint stores
            metrics.reset()
            metrics.log_start_time("wall", priority=790, round=0)
            metrics.load_state_dict(saved)  # what the trainer does on a mid-epoch resume
            wall = metrics.get_meter("default", "wall")
            assert wall.start_time is None and wall.smoothed_value == 0

            task = object.__new__(task_class)  # begin_epoch reads no config
            task.begin_epoch(2, None)
            started = wall.start_time
            assert started is not None
            task.begin_epoch(3, None)
            assert wall.start_time == started  # a running stopwatch is not reset
    finally:
        metrics.reset()
