"""`make demo`: the whole pipeline on a small generated corpus, on CPU, in a few minutes.

1. generate a corpus of synthetic sounds (tones, chirps, noise bursts, clicks) at mixed sample
   rates and channel counts, plus two broken files, to show they are reported and left out;
2. write TSV manifests with the audio-folder preparer;
3. compute features for every clip and print a summary;
4. pre-train ``eat_tiny`` with ``fairseq-hydra-train`` and show the loss falling;
5. load the checkpoint with ``fairseq.checkpoint_utils`` and extract embeddings;
6. draw the training curves (``eat-plot``) and list where every output is.

Steps 4-6 need fairseq (step 6 also matplotlib); ``--features-only`` stops after step 3.
``--corpus-only DIR`` only writes the generated corpus (one sub-folder per kind of sound, usable as a
labelled folder by ``manifests/labeled_folder.py``) into a new folder DIR.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import soundfile as sf
import torch

from eat_fairseq.data.audio import to_mono_16k
from eat_fairseq.data.clips import read_row
from eat_fairseq.data.manifest import read_manifest_rows
from eat_fairseq.data.features import FeatureConfig, waveform_to_features
from eat_fairseq.prep.audio_folder import write_audio_folder_manifest

REPO = Path(__file__).resolve().parents[1]
RATES = (8000, 16000, 22050, 44100)


def synth_clip(kind: int, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One synthetic sound of a given kind; different kinds have different time-frequency shapes."""
    t = np.arange(int(sr * seconds)) / sr
    if kind == 0:  # harmonic tone with vibrato
        f0 = rng.uniform(150, 600)
        phase = 2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
        x = sum(np.sin(k * phase) / k for k in range(1, 6))
    elif kind == 1:  # rising or falling chirp
        f_start, f_end = rng.uniform(200, 3500, size=2)
        freq = f_start + (f_end - f_start) * t / seconds
        x = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    elif kind == 2:  # band of noise bursts
        x = rng.standard_normal(t.size) * (np.sin(2 * np.pi * rng.uniform(1, 4) * t) > 0)
    else:  # click train
        x = np.zeros(t.size)
        period = int(sr / rng.uniform(5, 20))
        x[:: max(period, 1)] = 1.0
        x = np.convolve(x, np.hanning(64), mode="same")
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.8)
    return (x + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def make_corpus(root: Path, num_clips: int = 64, seed: int = 0) -> None:
    """Write ``num_clips`` clips under ``root/kind{k}/`` plus two broken files under ``root/_broken/``
    (a leading underscore: labelled-folder preparers do not take it for a class)."""
    rng = np.random.default_rng(seed)
    for i in range(num_clips):
        kind = i % 4
        sr = RATES[rng.integers(len(RATES))]
        x = synth_clip(kind, sr, rng.uniform(0.8, 2.0), rng)
        if rng.random() < 0.3:  # some stereo files
            x = np.stack([x, np.roll(x, 7) * 0.8], axis=1)
        folder = root / f"kind{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        ext = "flac" if i % 5 == 0 else "wav"
        sf.write(folder / f"clip{i:03d}.{ext}", x, sr)
    broken = root / "_broken"
    broken.mkdir(exist_ok=True)
    (broken / "empty.wav").write_bytes(b"")
    (broken / "not_audio.wav").write_text("this is not audio\n")


def manifest_features(manifest: Path, cfg: FeatureConfig, limit: Optional[int] = None) -> List[torch.Tensor]:
    """Features of the manifest's first ``limit`` rows (all: None), read as training reads them: the one
    row reader (any row kind) and the one feature path."""
    feats: List[torch.Tensor] = []
    for row in itertools.islice(read_manifest_rows(str(manifest)), limit):
        wave, sr = read_row(row, str(manifest))
        feats.append(waveform_to_features(to_mono_16k(wave, sr, cfg.sample_rate), cfg.sample_rate, cfg))
    return feats


def feature_summary(manifest: Path, cfg: FeatureConfig) -> str:
    start = time.perf_counter()
    feats = manifest_features(manifest, cfg)
    elapsed = time.perf_counter() - start
    stack = torch.stack(feats)
    return (
        f"features: {len(feats)} clips -> {tuple(stack.shape[1:])} each (T frames x 128 mel bins), "
        f"mean {stack.mean():.3f}, std {stack.std():.3f}, {1000 * elapsed / max(len(feats), 1):.1f} ms/clip "
        f"(load + resample + fbank)"
    )


def pretrain(data: Path, out: Path, updates: int) -> List[tuple[int, float]]:
    """Run fairseq-hydra-train on eat_tiny; returns (update, loss) pairs from the JSON log."""
    import eat_fairseq

    exe = shutil.which("fairseq-hydra-train", path=str(Path(sys.executable).parent)) or shutil.which(
        "fairseq-hydra-train"
    )
    if exe is None:
        raise SystemExit("fairseq-hydra-train not found: install the fairseq extra (make install)")
    cmd = [
        exe,
        "--config-dir",
        str(REPO / "examples" / "pretraining"),
        "--config-name",
        "eat_tiny",
        f"task.data={data}",
        f"common.user_dir={eat_fairseq.USER_DIR}",
        f"checkpoint.save_dir={out / 'checkpoints'}",
        f"optimization.max_update={updates}",
        # the recipe's 20 warm-up updates, fewer for short demos (the cosine schedule needs max_update > warm-up)
        f"lr_scheduler.warmup_updates={min(20, max(1, updates // 10))}",
        "common.log_format=json",
        "common.log_interval=20",
        f"checkpoint.save_interval_updates={updates}",
    ]
    print("$ " + " ".join(cmd), flush=True)
    log_path = out / "train.log"
    curve: List[tuple[int, float]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            point = parse_train_inner(line)
            if point:
                curve.append(point)
                print(f"  update {point[0]:4d}  loss {point[1]:.4f}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"training failed (exit {proc.returncode}); see {log_path}")
    return curve


def parse_train_inner(line: str) -> Optional[tuple[int, float]]:
    """(num_updates, loss) from a fairseq JSON ``train_inner`` log line, else None."""
    start = line.find("{")
    if start < 0 or "train_inner" not in line:
        return None
    try:
        stats = json.loads(line[start:])
        return int(stats["num_updates"]), float(stats["loss"])
    except (ValueError, KeyError):
        return None


def extract_embeddings(checkpoint: Path, manifest: Path, cfg: FeatureConfig, n: int = 8) -> str:
    from eat_fairseq._registration import import_layer_quietly

    import_layer_quietly()  # registers the model before loading
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    model = models[0].eval()
    feats = manifest_features(manifest, cfg, limit=n)
    with torch.no_grad():
        x = model.extract_features(torch.stack(feats))  # (B, 1 + P, D)
    cls = torch.nn.functional.normalize(x[:, 0], dim=-1)
    sim = cls @ cls.T
    off = sim[~torch.eye(len(feats), dtype=torch.bool)]
    return (
        f"embeddings: {len(feats)} clips -> {tuple(x.shape[1:])} (CLS + patches, D); utterance embedding = "
        f"CLS; mean cosine similarity between different clips {off.mean():.3f}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_run", help="working folder (recreated)")
    parser.add_argument("--clips", type=int, default=64, help="number of generated clips")
    parser.add_argument("--updates", type=int, default=300, help="pre-training updates of eat_tiny")
    parser.add_argument("--features-only", action="store_true", help="stop after the feature summary")
    parser.add_argument("--corpus-only", metavar="DIR", default=None,
                        help="only write the generated corpus into DIR (a new folder), then stop")
    args = parser.parse_args(argv)
    if args.corpus_only:
        target = Path(args.corpus_only)
        if target.exists() and any(target.iterdir()):
            parser.error(f"{target} exists and is not empty; choose a new folder")
        make_corpus(target, args.clips)
        kinds = sorted(p.name for p in target.iterdir() if p.is_dir() and not p.name.startswith("_"))
        print(f"wrote {args.clips} clips in {len(kinds)} classes ({', '.join(kinds)}) plus 2 broken files "
              f"(_broken/) under {target}")
        return 0

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    corpus, manifests = out / "corpus", out / "manifests"
    print(f"[1/6] generating {args.clips} clips (+2 broken files) under {corpus}", flush=True)
    make_corpus(corpus, args.clips)
    print("[2/6] writing manifests", flush=True)
    report = write_audio_folder_manifest(corpus, manifests, valid_percent=10, seed=0, workers=2)
    print(report.summary(), flush=True)
    for e in report.excluded:
        print(f"  excluded {e.path}: {e.reason}", flush=True)
    cfg = FeatureConfig(target_length=128)
    print("[3/6] computing features", flush=True)
    print(feature_summary(manifests / "train.tsv", cfg), flush=True)
    if args.features_only:
        return 0
    print(f"[4/6] pre-training eat_tiny for {args.updates} updates (CPU)", flush=True)
    curve = pretrain(manifests, out, args.updates)
    if len(curve) >= 2:
        first, last = curve[0][1], curve[-1][1]
        trend = "falling" if last < first else "NOT falling"
        print(f"loss: first {first:.4f} (update {curve[0][0]}) -> last {last:.4f} (update {curve[-1][0]}): {trend}")
    checkpoint = out / "checkpoints" / "checkpoint_last.pt"
    print(f"[5/6] extracting embeddings with {checkpoint}", flush=True)
    print(extract_embeddings(checkpoint, manifests / "train.tsv", cfg), flush=True)
    print("[6/6] drawing the training curves", flush=True)
    curves = draw_curves(out / "checkpoints", out / "curves.png")
    print(f"""
outputs in {out}:
  corpus/                  generated audio (+ 2 broken files, excluded from the manifests)
  manifests/               train.tsv, valid.tsv, excluded.tsv
  checkpoints/             checkpoint_last.pt (load with fairseq.checkpoint_utils or eat_fairseq.load_model)
  checkpoints/tb/          TensorBoard logs: tensorboard --logdir {out / 'checkpoints' / 'tb'}
  train.log                the training log
  curves.png               {curves}
""", flush=True)
    if any(math.isnan(v) for _, v in curve):
        print("the loss became NaN", file=sys.stderr)
        return 1
    return 0


def draw_curves(run_dir: Path, png: Path) -> str:
    """Training curves of the demo run (the library behind ``eat-plot``); a note when it cannot draw."""
    from eat_fairseq.cli.curves import plot_run

    try:
        summary = plot_run(str(run_dir), str(png), title="make demo: eat_tiny pre-training")
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'eat_fairseq[plot]')"
    return f"training curves ({', '.join(summary['panels'])}); eat-plot {run_dir} draws them again"


if __name__ == "__main__":
    raise SystemExit(main())
