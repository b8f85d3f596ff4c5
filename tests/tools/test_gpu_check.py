"""benchmarks/gpu_check.py without a GPU: it skips cleanly, and its CPU test mode runs every step.

The CUDA numbers themselves can only come from a GPU machine; these tests make sure the script's own
logic (mixed-precision update loop, extraction, fbank comparison, the torchrun + fairseq-hydra-train
command with a resume, the table) works before the first GPU hour is spent on it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure")
def test_skips_cleanly_without_cuda() -> None:
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA device" in proc.stdout


def test_cpu_test_mode_runs_the_measurement_steps(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = _run("--device", "cpu", "--tiny", "--skip-train", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"pretrain fp32 teacher=release", "pretrain bf16 teacher=release",
                            "pretrain bf16 teacher=fp32", "extraction", "fbank"}
    assert all(entry["ok"] for entry in results.values())
    for name in ("pretrain fp32 teacher=release", "pretrain bf16 teacher=release", "pretrain bf16 teacher=fp32"):
        r = results[name]["result"]
        assert r["clips_per_s"] > 0 and r["overflow_steps"] == 0 and r["last_loss"] == r["last_loss"]  # not NaN
    assert results["extraction"]["result"]["dim"] == 64
    assert results["fbank"]["result"]["equal"] and results["fbank"]["result"]["max_abs_diff"] <= 1e-3
    table = proc.stdout[proc.stdout.index("| check |"):]
    assert table.count("| pre-training |") == 3 and "| fbank parity |" in table and "clips/s" in table


def test_train_command_uses_nccl_through_torchrun_on_a_gpu(tmp_path: Path) -> None:
    cmd = _load().train_command("cuda", tiny=False, data=tmp_path / "m", save_dir=tmp_path / "c", max_update=10)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=1"]
    assert "--config-name" in cmd and cmd[cmd.index("--config-name") + 1] == "eat_base"
    for item in ("distributed_training.distributed_backend=nccl", "distributed_training.distributed_init_method=env://",
                 "distributed_training.distributed_world_size=1", "optimization.max_update=10",
                 f"checkpoint.save_dir={tmp_path / 'c'}"):
        assert item in cmd
    assert "common.cpu=true" not in cmd


def test_update_loop_skips_overflowing_steps_like_fairseq() -> None:
    """A loss scale so large that the gradients overflow: no optimizer or EMA step, the step is counted."""
    gc = _load()
    ok = gc.pretrain_throughput("cpu", True, "bf16", "release", steps=2, warmup=0, loss_scale=1.0)
    assert (ok["overflow_steps"], ok["ema_steps"]) == (0, 2)
    bad = gc.pretrain_throughput("cpu", True, "bf16", "release", steps=2, warmup=0, loss_scale=float("inf"))
    assert (bad["overflow_steps"], bad["ema_steps"]) == (2, 0)


@pytest.mark.slow
def test_cpu_test_mode_with_the_hydra_train_resume(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = _run("--device", "cpu", "--tiny", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = json.loads(out.read_text())["results"]["train"]["result"]
    assert train["ok"] and train["resumed"] and train["num_updates"] == train["num_ema_updates"] == 4
