"""The CPU recipe for a user's own labelled folder learns (issue 23), and a GPU recipe run on a CPU
adapts instead of drowning the user in DataLoader tracebacks.

``tiny`` predicted one class on a folder of three easy classes (accuracy 0.222): it checks the
pipeline, it is not a model. ``folder_cpu`` with the folder's own normalisation must classify such a
folder, from scratch, in seconds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import BIN, REPO, hydra_train_cmd, run

from eat_fairseq.cli.demo import synth_clip

FINETUNING = REPO / "examples" / "finetuning"


def _folder(root: Path, per_class: int = 14) -> Path:
    """Three classes of generated sounds (tones, noise bursts, clicks) at mixed rates, some stereo."""
    rng = np.random.default_rng(7)
    for kind, name in ((0, "tone"), (2, "noise"), (3, "clicks")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            sr = (8000, 16000, 22050, 44100)[i % 4]
            x = synth_clip(kind, sr, rng.uniform(0.6, 1.5), rng)
            sf.write(root / name / f"{name}{i:02d}.wav", x if i % 3 else np.stack([x, x], axis=1), sr)
    return root


@pytest.mark.fairseq
def test_folder_cpu_recipe_learns_a_small_folder_from_scratch(tmp_path: Path) -> None:
    pytest.importorskip("fairseq")
    corpus, data = _folder(tmp_path / "mine"), tmp_path / "data"
    run([sys.executable, str(REPO / "manifests" / "labeled_folder.py"), str(corpus), "--dest", str(data),
         "--valid-percent", "30"], cwd=tmp_path)
    norm = run([sys.executable, str(REPO / "manifests" / "norm_stats.py"), str(data)], cwd=tmp_path).split()[-2:]
    assert norm[0].startswith("++task.norm_mean=") and norm[1].startswith("++task.norm_std="), norm
    out = run(hydra_train_cmd(FINETUNING, "folder_cpu", [f"task.data={data}", "checkpoint.save_dir=ck",
                                                          "optimization.max_update=150",
                                                          "lr_scheduler.warmup_updates=15", *norm]), cwd=tmp_path)
    assert "adapted" not in out  # a CPU recipe: the CPU guard finds nothing to change
    printed = run([str(BIN / "eat-evaluate"), "--checkpoint", str(tmp_path / "ck" / "checkpoint_best.pt"),
                   "--data", str(data)], cwd=tmp_path)
    result = json.loads(next(line for line in printed.splitlines() if line.startswith('{"split"')))
    assert result["clips"] >= 9 and result["accuracy"] >= 0.8, result


@pytest.mark.fairseq
def test_custom_recipe_on_cpu_adapts_with_one_line_and_no_tracebacks(tmp_path: Path) -> None:
    """custom.yaml (fp16, 8 workers) on CPU, shrunk to a tiny model so that it runs in seconds."""
    pytest.importorskip("fairseq")
    corpus, data = _folder(tmp_path / "mine", per_class=4), tmp_path / "data"
    run([sys.executable, str(REPO / "manifests" / "labeled_folder.py"), str(corpus), "--dest", str(data),
         "--valid-percent", "30"], cwd=tmp_path)
    out = run(hydra_train_cmd(FINETUNING, "custom", [
        f"task.data={data}", "checkpoint.save_dir=ck", "model.model_path=null", "common.cpu=true",
        "model.embed_dim=64", "model.depth=2", "model.num_heads=4", "task.target_length=128",
        "optimization.max_update=3", "lr_scheduler.warmup_updates=1", "dataset.batch_size=4", "task.num_threads=1"]),
        cwd=tmp_path, timeout=300)
    adapted = [line for line in out.splitlines() if "GPU settings adapted" in line]
    assert len(adapted) == 1 and "common.fp16 true -> false" in adapted[0], out[-3000:]
    assert "dataset.num_workers 8 -> " in adapted[0]
    assert "Traceback" not in out and "Error" not in out, out[-3000:]
    assert (tmp_path / "ck" / "checkpoint_last.pt").exists()
