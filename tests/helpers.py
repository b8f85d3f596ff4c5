"""Shared helpers for the tests: small generated corpora and fairseq-hydra-train runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FSDD = SHARED / "data" / "fsdd" / "recordings"
BIN = Path(sys.executable).parent


# fairseq-hydra-train overrides for N gloo processes on CPU under torchrun (fairseq-notes trap 6)
DDP_CPU_OVERRIDES = (
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_world_size=${oc.env:WORLD_SIZE}",
        "distributed_training.distributed_rank=${oc.env:RANK}",
        "distributed_training.device_id=0",
)


def make_audio_corpus(root: Path, num_clips: int = 16, seed: int = 0, seconds: float = 1.3) -> Path:
    """Write ``num_clips`` short noisy tones at mixed rates/channels and a manifest folder beside them.

    Returns the manifest folder (``train.tsv`` and ``valid.tsv``).
    """
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_clips):
        sr = (8000, 16000, 22050)[i % 3]
        n = int(sr * seconds)
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
        if i % 4 == 0:
            x = np.stack([x, 0.5 * x], axis=1)
        rel = f"clip{i:03d}.wav"
        sf.write(audio / rel, x.astype(np.float32), sr)
        rows.append((rel, n))
    manifests = root / "manifests"
    manifests.mkdir(exist_ok=True)
    body = "".join(f"{r}\t{n}\n" for r, n in rows)
    (manifests / "train.tsv").write_text(f"{audio}\n{body}")
    (manifests / "valid.tsv").write_text(f"{audio}\n{body}")
    return manifests


def hydra_train_cmd(config_dir: Path, config_name: str, overrides: Sequence[str]) -> List[str]:
    import eat_fairseq

    exe = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    return [
        exe,
        "--config-dir",
        str(config_dir),
        "--config-name",
        config_name,
        f"common.user_dir={eat_fairseq.USER_DIR}",
        *overrides,
    ]


def run(cmd: Sequence[str], cwd: Path, env: Optional[Dict[str, str]] = None, timeout: int = 600) -> str:
    """Run a command, return its combined output; fail the test with the output on error."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full_env.update(env or {})
    proc = subprocess.run(
        list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-6000:]}")
    return proc.stdout


def json_logs(output: str, kind: str = "train_inner") -> List[dict]:
    """The JSON stats dicts fairseq printed for ``kind`` (train_inner, train, valid)."""
    out = []
    for line in output.splitlines():
        if f"| {kind} |" in line or f"[{kind}]" in line:
            start = line.find("{")
            if start >= 0:
                try:
                    out.append(json.loads(line[start:]))
                except ValueError:
                    pass
    return out


def compose_recipe(config_dir: Path, config_name: str, overrides: Sequence[str] = ()):
    """The config fairseq-hydra-train builds from a recipe and command-line overrides, without training.

    Same steps as ``fairseq_cli.hydra_train``: the FairseqConfig schema stored under the config name,
    hydra composition (version_base 1.1, as fairseq's ``@hydra.main`` without one), fairseq's
    ``add_defaults`` (our registered dataclasses, which check names and types), then the resolved,
    struct-locked copy that training sees. Raises what fairseq-hydra-train would report.
    """
    import warnings

    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import eat_fairseq.fairseq_ext  # noqa: F401  (registers the eat_* dataclasses)

    hydra_init(config_name)
    GlobalHydra.instance().clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.1"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg
