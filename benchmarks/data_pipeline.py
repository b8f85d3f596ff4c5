"""Input-pipeline throughput: clips/s from a manifest row to a normalised fbank, per worker core.

For each corpus (10 s 16 kHz mono WAV; 10 s 44.1 kHz stereo FLAC, which needs resampling) and
storage (loose files; uncompressed zip shards written by manifests/pack.py; shards with --flac),
it measures the training dataset (``EATAudioDataset``, what a fairseq data-loader worker runs per
clip) in the main process (1 worker core) and through a running torch DataLoader with 2 worker
processes (collation and the transfer of batches to the main process included),
plus the release's per-clip path (soundfile, torchaudio resample per channel, channel mean, DC,
``torchaudio.compliance.kaldi.fbank``, pad/crop, normalise) on the loose files. A long-file row
(a 10-minute WAV, first window) shows that the cost no longer depends on the file's length.

Configurations are measured in interleaved rounds and the median per configuration is reported, so
a machine shared with other jobs slows all of them alike; compare the ratios. Each row gives clips
per wall second and clips per CPU second (of the process, or of the worker processes): on a busy
machine the latter is what a dedicated core would deliver. Run:

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py [--clips 64] [--rounds 3] [--workers 2]
        [--tmp DIR] [--quick]

The corpus is generated under --tmp (default: a temporary folder, deleted afterwards).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as taf

from eat_fairseq.data.features import FeatureConfig, pad_or_crop, normalize
from eat_fairseq.data.manifest import read_manifest
from eat_fairseq.prep.pack import pack_manifests

CFG = FeatureConfig()  # 1024 frames, AudioSet statistics: the pre-training setting


def write_corpus(root: Path, name: str, clips: int, sr: int, channels: int, fmt: str, seconds: float = 10.0) -> Path:
    """``clips`` noisy chirps; returns a manifest folder with train.tsv."""
    rng = np.random.default_rng(0)
    audio = root / f"{name}_audio"
    audio.mkdir(parents=True)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    rows = []
    for i in range(clips):
        x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t * (1 + t / seconds)) + 0.05 * rng.standard_normal(n)
        data = np.stack([x, 0.5 * x], 1) if channels == 2 else x
        rel = f"clip{i:04d}.{fmt}"
        sf.write(audio / rel, data.astype(np.float32), sr, subtype="PCM_16")
        rows.append(f"{rel}\t{n}")
    manifests = root / name
    manifests.mkdir()
    (manifests / "train.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
    return manifests


def release_features(path: str) -> torch.Tensor:
    """The release's per-clip path (docs/reference.md section 1), one clip at a time with torchaudio."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.T.copy())
    if sr != 16000:
        wave = taf.resample(wave, sr, 16000)
    wave = wave.mean(0)
    wave = wave - wave.mean()
    fbank = kaldi.fbank(wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    return normalize(pad_or_crop(fbank, CFG.target_length), CFG.norm_mean, CFG.norm_std)


def time_serial(fn: Callable[[int], object], n: int) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoaderBench:
    """A DataLoader with persistent workers, started (one pass) before it is timed, so the rows
    show the steady state of an epoch rather than worker start-up."""

    def __init__(self, dataset, workers: int, batch: int = 8) -> None:
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                                  collate_fn=dataset.collater, persistent_workers=True)
        self._epoch()
        self.pids = [w.pid for w in self.loader._iterator._workers]  # private, but stable since torch 1.7

    def _epoch(self) -> int:
        return sum(b["net_input"]["source"].shape[0] for b in self.loader)

    def __call__(self) -> tuple[float, float]:
        """(clips per wall second / workers, clips per CPU second of the worker processes)."""
        wall, cpu = time.perf_counter(), sum(map(_process_cpu, self.pids))
        count = self._epoch()
        elapsed = time.perf_counter() - wall
        used = sum(map(_process_cpu, self.pids)) - cpu
        return count / elapsed / self.workers, count / max(used, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per corpus (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the parallel rows")
    parser.add_argument("--tmp", help="folder for the generated corpus (kept)")
    parser.add_argument("--quick", action="store_true", help="8 clips, 1 round: a correctness run")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.rounds = 8, 1
    torch.set_num_threads(1)  # one core per worker, as in a data loader
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset  # imports fairseq

    root = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="eat_pipeline_"))
    try:
        print(f"generating {args.clips} clips per corpus in {root} ...", flush=True)
        corpora = {
            "wav 16k mono": write_corpus(root, "wav16k", args.clips, 16000, 1, "wav"),
            "flac 44.1k stereo": write_corpus(root, "flac44k", args.clips, 44100, 2, "flac"),
        }
        long_dir = write_corpus(root, "long", 1, 16000, 1, "wav", seconds=600.0)
        configs: Dict[str, Callable[[], float]] = {}
        n = args.clips
        for label, manifests in corpora.items():
            storages = {"loose": manifests / "train.tsv"}
            pack_manifests(manifests, root / f"{manifests.name}_shards", shard_size=200_000_000)
            storages["shards"] = root / f"{manifests.name}_shards" / "train.tsv"
            if label.startswith("wav"):
                pack_manifests(manifests, root / f"{manifests.name}_flacshards", shard_size=200_000_000, flac=True)
                storages["shards+flac"] = root / f"{manifests.name}_flacshards" / "train.tsv"
            for storage, tsv in storages.items():
                ds = EATAudioDataset(str(tsv), CFG, shuffle=False)
                configs[f"{label} | {storage} | 1 core"] = lambda ds=ds: time_serial(ds.__getitem__, n)
                if args.workers > 1:
                    configs[f"{label} | {storage} | {args.workers} workers"] = LoaderBench(ds, args.workers)
            rows = read_manifest(str(manifests / "train.tsv"))[1]
            configs[f"{label} | loose, release per-clip path | 1 core"] = (
                lambda rows=rows: time_serial(lambda i: release_features(rows[i].path), n))
        long_ds = EATAudioDataset(str(long_dir / "train.tsv"), CFG, shuffle=False)
        long_whole = EATAudioDataset(str(long_dir / "train.tsv"), CFG, shuffle=False, whole_file=True)
        configs["wav 16k 10 min file | first window (default) | 1 core"] = lambda: time_serial(
            lambda i: long_ds[0], max(4, n // 4))
        configs["wav 16k 10 min file | read_whole_file=true | 1 core"] = lambda: time_serial(
            lambda i: long_whole[0], 2)

        for fn in configs.values():  # warm-up: page cache, filterbank caches, lazy imports
            fn()
        results: Dict[str, List[tuple[float, float]]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for key, fn in configs.items():
                results[key].append(fn())
            print(f"round {r + 1}/{args.rounds} done", flush=True)

        print(f"\nclips/s per worker core, median of {args.rounds} interleaved rounds of {n} clips; torch threads 1; "
              f"{os.cpu_count()} CPUs visible; load average {os.getloadavg()[0]:.1f}.\n"
              "wall: clips per second of elapsed time (per worker for the N-worker rows); "
              "cpu: clips per CPU-second of the process(es) doing the work,\n"
              "which is what one dedicated core delivers when other jobs share the machine. "
              "N-worker rows: a running DataLoader (workers started beforehand).\n")
        width = max(len(k) for k in configs)
        print(f"{'corpus | storage / path | parallelism':<{width}}  {'wall':>8}  {'cpu':>8}")
        for key, values in results.items():
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            print(f"{key:<{width}}  {wall:8.1f}  {cpu:8.1f}")
    finally:
        if not args.tmp:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
