"""Normalisation statistics of a user's own training split: ``task.norm_mean`` / ``task.norm_std``.

Why: the model sees ``(fbank - norm_mean) / (2 * norm_std)``, and the defaults are AudioSet's. A folder of
quiet speech, drum hits or generated tones sits elsewhere on the log-mel scale, so its inputs would be
shifted and scaled away from the range the recipes' learning rates and initialisation expect. The
statistics must come from the TRAINING split only (the validation clips stay unseen) and from the same
features training computes, so this module reads every row through the dataset's own path: the row
reader's window (:func:`eat_fairseq.data.clips.read_row_window`, ``crop=start``), the mix-down and
resampling (:func:`eat_fairseq.data.audio.to_mono_16k`) and :func:`eat_fairseq.data.features.fbank_of`.
Only the real frames of each clip's window count (the zero padding of short clips is not audio).

Deterministic: rows in manifest order, sums in float64.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from eat_fairseq.data.audio import to_mono_16k
from eat_fairseq.data.clips import read_row_window
from eat_fairseq.data.features import FeatureConfig, fbank_of
from eat_fairseq.data.manifest import read_manifest_rows
from eat_fairseq.prep.common import PrepError, check_outputs, new_parser, write_text_atomic

OUTPUT_NAME = "norm_overrides.txt"

HELP_EPILOG = f"""\
input: DATA/{{split}}.tsv (any manifest the trainer reads: files, spans, shard members); by default the
training split, so the validation clips stay unseen.
statistics: the mean and the (population) standard deviation of every log-mel value of every clip's
first --target-length frames (the window training reads with task.crop=start; 0 = whole clips),
padding not counted, computed by the trainer's own feature code.
output: DATA/{OUTPUT_NAME} (or --out FILE), one line of hydra overrides, also printed on stdout:
  ++task.norm_mean=-6.1234 ++task.norm_std=3.4567
('++' sets a key whether or not the recipe lists it)
pass them to fairseq-hydra-train (e.g. `$(cat DATA/{OUTPUT_NAME})`) for training AND use the checkpoint
as is afterwards (eat-evaluate, eat-tag and the API read them from it). A summary goes to stderr.
An existing output is not overwritten without --force.
exit status: 0 written, 2 bad arguments/input or the output in the way."""


@dataclass(frozen=True)
class NormStats:
    """Statistics of one split: ``mean``/``std`` of the log-mel values over ``frames`` frames of ``clips`` clips."""

    mean: float
    std: float
    clips: int
    frames: int

    def overrides(self) -> str:
        """The hydra overrides (4 decimals: far below what changes a model); ``++`` sets the keys in any
        recipe, also one that does not list them (``eat_tiny`` leaves them at their defaults)."""
        return f"++task.norm_mean={self.mean:.4f} ++task.norm_std={self.std:.4f}"


def compute_norm_stats(manifest: str | os.PathLike, target_length: Optional[int] = 128,
                       features: Optional[FeatureConfig] = None) -> NormStats:
    """Mean and std of the fbank values of a manifest's clips, as training computes the fbank.

    ``target_length`` frames from the start of each clip (None: whole clips); ``features`` gives the
    sample rate and mel bins (its own ``target_length`` and normalisation are not used).
    """
    base = features if features is not None else FeatureConfig()
    cfg = FeatureConfig(sample_rate=base.sample_rate, num_mel_bins=base.num_mel_bins, target_length=target_length)
    path = os.fspath(manifest)
    if not os.path.isfile(path):
        raise PrepError(f"{path}: manifest not found")
    rows = read_manifest_rows(path, check_root=True)
    total = torch.zeros((), dtype=torch.float64)
    total_sq = torch.zeros((), dtype=torch.float64)
    count = frames = clips = 0
    for row in rows:
        wave, sr = read_row_window(row, cfg, crop="start", manifest=path)
        fbank = fbank_of(to_mono_16k(wave, sr, cfg.sample_rate), cfg.sample_rate, cfg)
        if target_length is not None:
            fbank = fbank[:target_length]
        values = fbank.to(torch.float64)
        total += values.sum()
        total_sq += values.square().sum()
        count += values.numel()
        frames += fbank.shape[0]
        clips += 1
    if count == 0:
        raise PrepError(f"{path}: no frames to compute statistics from (an empty split?)")
    mean = float(total / count)
    var = max(float(total_sq / count) - mean * mean, 0.0)
    if not var > 0.0:
        raise PrepError(f"{path}: every fbank value is the same; no standard deviation to normalise with")
    return NormStats(mean=mean, std=math.sqrt(var), clips=clips, frames=frames)


def write_norm_stats(data: str | os.PathLike, split: str = "train", target_length: Optional[int] = 128,
                     out: str | os.PathLike | None = None, force: bool = False) -> tuple[NormStats, Path]:
    """Compute the statistics of ``data/{split}.tsv`` and write their overrides line to ``out``
    (default ``data/norm_overrides.txt``); refuses an existing ``out`` unless ``force``."""
    target = Path(out) if out is not None else Path(data) / OUTPUT_NAME
    check_outputs([target], force)
    stats = compute_norm_stats(Path(data) / f"{split}.tsv", target_length)
    write_text_atomic(target, stats.overrides() + "\n")
    return stats, target


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Compute task.norm_mean / task.norm_std from a training split's own fbank features.",
                        HELP_EPILOG)
    parser.add_argument("data", metavar="DATA", help="the manifest folder (task.data)")
    parser.add_argument("--split", default="train", help="the split to measure (default: %(default)s)")
    parser.add_argument("--target-length", type=int, default=128, metavar="T",
                        help="frames per clip, as the recipe's task.target_length; 0 = whole clips "
                             "(default: %(default)s)")
    parser.add_argument("--out", metavar="FILE", help=f"output file (default: DATA/{OUTPUT_NAME})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_length < 0:
        print("error: --target-length must be >= 0", file=sys.stderr)
        return 2
    try:
        stats, target = write_norm_stats(args.data, args.split, args.target_length or None, args.out, args.force)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.split}: {stats.clips} clips, {stats.frames} frames: mean {stats.mean:.4f}, std {stats.std:.4f} "
          f"-> {target}", file=sys.stderr)
    print(stats.overrides())
    return 0
