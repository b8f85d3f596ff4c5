"""Wall time of EAT feature extraction per 10 s clip.

Compares the batched ``kaldi_fbank`` (one clip, and a batch reported per clip) with torchaudio's
``compliance.kaldi.fbank`` called once per clip, on CPU and on CUDA when available. Run:

    python benchmarks/features.py [--batch 32] [--repeats 5] [--seconds 10] [--threads N]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from eat_fairseq.data.features import kaldi_fbank, release_fbank




def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` wall times (seconds) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(device: torch.device, batch: int, seconds: float, repeats: int) -> None:
    samples = int(seconds * 16000)
    g = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(batch, samples, generator=g)).to(device)
    one = waves[:1]

    single = best_time(lambda: kaldi_fbank(one), device, repeats)
    batched = best_time(lambda: kaldi_fbank(waves), device, repeats)
    loop = best_time(lambda: [release_fbank(w) for w in waves], device, repeats)
    print(f"[{device.type}] kaldi_fbank single clip (1, S):      {1e3 * single:8.2f} ms/clip")
    print(f"[{device.type}] kaldi_fbank batch {batch} (B, S):        {1e3 * batched / batch:8.2f} ms/clip"
          f"  ({1e3 * batched:.1f} ms per batch)")
    print(f"[{device.type}] torchaudio kaldi.fbank loop of {batch}:  {1e3 * loop / batch:8.2f} ms/clip")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
          f"clip: {args.seconds:g} s at 16 kHz, best of {args.repeats}")
    with torch.inference_mode():
        run(torch.device("cpu"), args.batch, args.seconds, args.repeats)
        if torch.cuda.is_available():
            print(f"cuda device: {torch.cuda.get_device_name()}")
            run(torch.device("cuda"), args.batch, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
