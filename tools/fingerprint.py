"""Fingerprint what the project computes: sha256 of every tensor of three small fixed-seed runs.

A restructuring (files moved, paths merged) must not change a single bit of what training, fine-tuning
and extraction compute. This script runs, on one thread and from generated audio:

1. ``eat_tiny`` pre-training, 10 updates (``fairseq-hydra-train``);
2. the ``tiny`` fine-tuning recipe from that checkpoint, 6 updates;
3. ``eat-extract`` (``--granularity all``) of three clips with the pre-training checkpoint;

and prints (or writes with ``--record``) the sha256 of every tensor: model weights, optimizer state,
extracted arrays. ``--check FILE`` compares with a recorded fingerprint and exits 1 on any difference,
naming the tensors that differ. Bitwise equality holds on one machine (CPU kernels differ between
processor families), so record and check on the same machine.

    python tools/fingerprint.py --record before.json      # on the old commit
    python tools/fingerprint.py --check before.json       # on the new one
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FREQS = {"/m/low": 300.0, "/m/mid": 1200.0, "/m/high": 4000.0}


def write_corpus(root: Path) -> Path:
    """Tones at three pitches + noise, mixed rates: train/valid manifests, labels, descriptors."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True)
    data = root / "data"
    data.mkdir()
    names = list(FREQS)
    (data / "label_descriptors.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{m},"{m[3:]}"\n' for i, m in enumerate(names))
    )
    for split, count in (("train", 12), ("valid", 6)):
        tsv, lbl = [str(audio)], []
        for i in range(count):
            labels = [names[i % 3]] + ([names[(i + 1) % 3]] if i % 4 == 3 else [])
            sr = 16000 if i % 2 else 22050
            t = np.arange(int(1.4 * sr)) / sr
            x = sum(0.3 * np.sin(2 * np.pi * FREQS[lab] * t) for lab in labels) + 0.05 * rng.standard_normal(len(t))
            rel = f"{split}_{i:02d}.wav"
            sf.write(audio / rel, np.asarray(x, dtype=np.float32), sr)
            tsv.append(f"{rel}\t{len(t)}")
            lbl.append(f"{split}_{i:02d}\t{','.join(labels)}")
        (data / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (data / f"{split}.lbl").write_text("\n".join(lbl) + "\n")
    return data


def run(cmd: list, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}")


def digest(array) -> str:
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def tensors(obj, prefix: str, out: dict) -> None:
    """Every tensor / array inside nested dicts and lists, keyed by its path."""
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = digest(obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()) + f" {obj.dtype} {tuple(obj.shape)}"
    elif isinstance(obj, np.ndarray):
        out[prefix] = digest(obj)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            tensors(obj[key], f"{prefix}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            tensors(item, f"{prefix}/{i}", out)


def checkpoint_tensors(path: Path, name: str, out: dict) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    tensors(state["model"], f"{name}/model", out)
    tensors(state.get("last_optimizer_state", {}), f"{name}/optimizer", out)


def fingerprint(work: Path) -> dict:
    import eat_fairseq

    data = write_corpus(work)
    hydra = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    user_dir = f"common.user_dir={eat_fairseq.USER_DIR}"
    pre = work / "pretrain"
    run([hydra, "--config-dir", REPO / "examples" / "pretraining", "--config-name", "eat_tiny", user_dir,
         f"task.data={data}", f"checkpoint.save_dir={pre}", "optimization.max_update=10",
         "dataset.batch_size=4"], work)
    fine = work / "finetune"
    run([hydra, "--config-dir", REPO / "examples" / "finetuning", "--config-name", "tiny", user_dir,
         f"task.data={data}", f"checkpoint.save_dir={fine}", f"model.model_path={pre / 'checkpoint_last.pt'}",
         "optimization.max_update=6"], work)
    emb = work / "embeddings"
    clips = [str(data.parent / "audio" / f"valid_{i:02d}.wav") for i in range(3)]
    run([sys.executable, "-m", "eat_fairseq.cli.extract", "--checkpoint", str(pre / "checkpoint_last.pt"),
         "--out", str(emb), "--granularity", "all", "--threads", "1", *clips], work)

    out: dict = {}
    checkpoint_tensors(pre / "checkpoint_last.pt", "pretrain", out)
    checkpoint_tensors(fine / "checkpoint_last.pt", "finetune", out)
    for f in sorted(emb.rglob("*.npz")):
        with np.load(f) as z:
            for key in sorted(z.files):
                out[f"extract/{f.relative_to(emb)}/{key}"] = digest(z[key])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--record", type=Path, help="write the fingerprint to this JSON file")
    group.add_argument("--check", type=Path, help="compare with a recorded fingerprint; exit 1 on a difference")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        result = fingerprint(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = fingerprint(Path(tmp))
    if args.record:
        args.record.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"{len(result)} tensors recorded in {args.record}")
        return 0
    if args.check:
        expected = json.loads(args.check.read_text())
        differ = sorted(k for k in set(expected) | set(result) if expected.get(k) != result.get(k))
        for key in differ[:40]:
            print(f"DIFFERS {key}: {expected.get(key, 'missing')} -> {result.get(key, 'missing')}")
        print(f"{len(result)} tensors, {len(differ)} differ from {args.check}")
        return 1 if differ else 0
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
