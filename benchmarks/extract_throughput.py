"""Throughput (clips/s) of ``load_model(...).extract`` on 10 s clips with a randomly initialised EAT-base.

The checkpoint is built in memory (our pre-training layout, random weights) and
written to a temporary file, so nothing is downloaded; the timing covers the whole public path:
fbank, windowing, encoder, stitching, numpy conversion. Batch size 1 passes one clip per call;
batch size B passes a list of B clips (windows are batched internally). Run:

    python benchmarks/extract_throughput.py [--clips 8] [--batch-sizes 1 8] [--threads N]
        [--granularity utterance|frame|all] [--size base|large] [--devices cpu cuda]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from eat_fairseq.inference.api import EATModelHandle, load_model
from eat_fairseq.checkpoints.convert import build_checkpoint
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig


def random_checkpoint(path: str, size: str) -> None:
    """An EAT-{base,large} pre-training checkpoint with random weights (AudioSet feature settings)."""
    cfg = PretrainConfig.large() if size == "large" else PretrainConfig.base()
    model = EATPretrainingModel(cfg)
    torch.save(build_checkpoint("pretrained", model.state_dict(), cfg), path)


def clips_per_second(handle: EATModelHandle, clips: list[np.ndarray], batch: int, granularity: str) -> float:
    """Clips/s over all ``clips`` after one warm-up call, ``batch`` clips per ``extract`` call."""
    handle.extract(clips[:batch] if batch > 1 else clips[0], granularity=granularity)
    if handle.device.type == "cuda":
        torch.cuda.synchronize(handle.device)
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        handle.extract(clips[i : i + batch] if batch > 1 else clips[i], granularity=granularity)
    if handle.device.type == "cuda":
        torch.cuda.synchronize(handle.device)
    return len(clips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="timed clips per setting (after a warm-up call)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--granularity", default="utterance", choices=("utterance", "frame", "all"))
    parser.add_argument("--size", default="base", choices=("base", "large"))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32) for _ in range(args.clips)]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, EAT-{args.size} random weights, "
          f"{args.clips} clips of {args.seconds:g} s, granularity {args.granularity}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "eat_random.pt")
        torch.manual_seed(0)
        random_checkpoint(path, args.size)
        for device in devices:
            name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
            for batch in args.batch_sizes:
                handle = load_model(path, device=device, batch_size=max(batch, 1))
                rate = clips_per_second(handle, clips, batch, args.granularity)
                print(f"{device:5s} ({name}) batch {batch:3d}: {rate:8.2f} clips/s  ({1000.0 / rate:8.1f} ms/clip)")


if __name__ == "__main__":
    main()
