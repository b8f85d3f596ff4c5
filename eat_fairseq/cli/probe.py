"""``eat-probe``: frozen-feature evaluation of EAT encoders on a labelled manifest folder.

    eat-probe --data fsdd_speakers --folds auto CKPT.pt [CKPT2.pt ...] --teacher --random-init
    eat-probe --data data/esc50/fold1 --train train --test eval released_EAT-base.pt --layers last
    eat-probe --data fsdd_speakers --folds auto --arch tiny --random-init --target-length 256

For every checkpoint (ours, converted, released, or a Hugging Face ``.safetensors``; pre-training or
fine-tuned), every chosen layer and pooling, it fits a standardised logistic regression and a kNN
classifier on frozen features and prints their accuracy (mean +- std over folds), next to the
log-mel baseline (the same classifiers on pooled normalised fbank). See
:mod:`eat_fairseq.evaluation.probe` for the poolings, classifiers and folds. Runs without fairseq.

Data: ``DIR/{split}.tsv`` (manifest), ``DIR/{split}.lbl`` (one label per clip) and
``DIR/label_descriptors.csv``. ``--folds auto`` holds out each labelled split in turn (e.g. one split
per speaker: ``manifests/fsdd.py --split-by speaker``); ``--train A --test B`` uses one fixed pair.

Exit status: 0 done, 2 bad arguments or unusable inputs (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

from eat_fairseq.cli.common import add_threads_argument, apply_threads
from eat_fairseq.evaluation.probe import L2_FOLDS

logger = logging.getLogger("eat_fairseq.probe")

PRESETS = ("tiny", "small", "base", "large")


class ProbeCLIError(Exception):
    """A user error: reported as one line, exit status 2."""


def _encoder_preset(name: str) -> Any:
    from eat_fairseq.model.encoder import EncoderConfig

    return {
        "tiny": EncoderConfig.tiny,
        "small": EncoderConfig.small,
        "base": EncoderConfig.base,
        "large": EncoderConfig.large,
    }[name]()


def _layers(spec: str, depth: int) -> list[int]:
    if spec == "all":
        return list(range(depth))
    if spec == "last":
        return [depth - 1]
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ProbeCLIError(f"--layers must be 'all', 'last' or comma-separated block indices, got {spec!r}") from None
    for layer in layers:
        if not -depth <= layer < depth:
            raise ProbeCLIError(f"--layers: block {layer} does not exist in a {depth}-block encoder")
    return sorted({layer % depth for layer in layers})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eat-probe",
        description="Frozen-feature probe (logistic regression + kNN) of EAT encoders on a labelled manifest folder.",
        epilog="Data:" + __doc__.split("Data:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="checkpoints to probe (any EAT format)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled manifest folder")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--folds", default=None, metavar="auto|A,B,...",
                       help="leave-one-split-out over these splits (default: auto = every labelled split)")
    split.add_argument("--train", default=None, metavar="SPLIT", help="fixed training split (with --test)")
    p.add_argument("--test", default=None, metavar="SPLIT", help="fixed test split (with --train)")
    p.add_argument("--teacher", action="store_true", help="also probe the EMA teacher of pre-training checkpoints")
    p.add_argument("--random-init", action="store_true",
                   help="also probe a randomly initialised encoder of the same architecture (the first "
                        "checkpoint's, or --arch)")
    p.add_argument("--arch", choices=PRESETS, default=None, help="architecture for --random-init without a checkpoint")
    p.add_argument("--seed", type=int, default=1, help="seed of the random initialisation (default 1)")
    p.add_argument("--layers", default="all", help="all (default), last, or block indices such as 0,3 (0-based)")
    p.add_argument("--pooling", default="cls,mean,freq",
                   help="comma-separated subset of cls,mean,freq,freqstd (freqstd: per-frequency time mean and std, "
                        "the statistics of the logmel-meanstd row)")
    p.add_argument("--no-logmel", action="store_true", help="skip the log-mel baseline rows")
    p.add_argument("--target-length", type=int, default=None,
                   help="input frames per clip (default: the checkpoint's task.target_length)")
    p.add_argument("--norm-mean", type=float, default=None, help="fbank mean (default: the checkpoint's)")
    p.add_argument("--norm-std", type=float, default=None, help="fbank std (default: the checkpoint's)")
    p.add_argument("--pool-padding", action="store_true",
                   help="pool over every patch of the window, padding included (default: real frames only)")
    p.add_argument("--natural-length", action="store_true",
                   help="pad each clip only to the next whole patch (cropped to the target length) instead of "
                        "to the full window, so short clips are not mostly padding")
    p.add_argument("--whole-clips", action="store_true",
                   help="probe every clip whole: padded to a whole patch only, up to the longest input the encoder "
                        "takes (max_length time patches: 12,288 frames, about 123 s, for EAT-base) instead of "
                        "the training window; the log-mel rows use the same frames (implies --natural-length)")
    p.add_argument("--l2-folds", choices=L2_FOLDS, default="next",
                   help="with --folds: the logistic regression's L2 strength is chosen on the next fold (default) "
                   "or on every other training fold, mean accuracy (k-1 times slower; steadier when two models "
                   "that differ little are compared, e.g. int8 against fp32)")
    p.add_argument("--max-per-split", type=int, default=None, help="use at most N evenly spaced clips per split")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_threads_argument(p)
    p.add_argument("--trust-checkpoint", action="store_true", help="read .pt files with full unpickling")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows and settings as JSON")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Probe everything the arguments ask for; returns ``{"settings", "rows", "chance"}``."""
    from eat_fairseq.inference.api import load_model
    from eat_fairseq.checkpoints.load import CheckpointError
    from eat_fairseq.model.encoder import EATEncoder
    from eat_fairseq.data.features import DEFAULT_TARGET_LENGTH, FeatureConfig
    from eat_fairseq.data.labels import LabelError
    from eat_fairseq.data.manifest import ManifestError
    from eat_fairseq.evaluation.probe import (POOLINGS, SplitSpec, chance_level, cropped_clips, format_table,
                                              load_probe_data, parse_splits, probe_encoder, probe_logmel)

    if not os.path.isdir(args.data):
        raise ProbeCLIError(f"--data {args.data}: not a folder")
    if (args.train is None) != (args.test is None):
        raise ProbeCLIError("--train and --test go together")
    if not args.checkpoints and not (args.random_init and args.arch):
        raise ProbeCLIError("nothing to probe: give checkpoints, or --random-init with --arch")
    poolings = [p.strip() for p in args.pooling.split(",") if p.strip()]
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise ProbeCLIError(f"--pooling: unknown {bad} (choose from {','.join(POOLINGS)})")
    if args.batch_size < 1:
        raise ProbeCLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        spec = SplitSpec(train=args.train, test=args.test) if args.train else parse_splits(args.folds or "auto", args.data)
    except ValueError as exc:
        raise ProbeCLIError(str(exc)) from None

    encoders: list[tuple[str, EATEncoder]] = []
    feat: Optional[FeatureConfig] = None
    try:
        for path in args.checkpoints:
            name = os.path.basename(path)
            handle = load_model(path, device=args.device, trusted=args.trust_checkpoint)
            feat = feat or handle.feature_cfg
            encoders.append((f"{name}:student" if handle.kind == "pretrained" else name, handle.encoder))
            if args.teacher and handle.kind == "pretrained":
                encoders.append((f"{name}:teacher", load_model(path, device=args.device, trusted=args.trust_checkpoint,
                                                               use_teacher=True).encoder))
    except (CheckpointError, OSError) as exc:
        raise ProbeCLIError(str(exc)) from None
    if args.random_init:
        enc_cfg = encoders[0][1].cfg if encoders else _encoder_preset(args.arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            encoders.append((f"random-init(seed {args.seed})", EATEncoder(enc_cfg).to(args.device)))
    feat = feat or FeatureConfig()
    overrides = {k: v for k, v in (("target_length", args.target_length), ("norm_mean", args.norm_mean),
                                   ("norm_std", args.norm_std)) if v is not None}
    if args.whole_clips:
        if args.target_length is not None:
            raise ProbeCLIError("--whole-clips and --target-length exclude each other")
        overrides["target_length"] = min(enc.cfg.patch_size * enc.cfg.max_length for _, enc in encoders) if encoders \
            else 16 * 768
        args.natural_length = True
    if overrides:
        feat = FeatureConfig(**{**feat.__dict__, **overrides})

    start = time.perf_counter()
    try:
        data = load_probe_data(args.data, spec, feat.sample_rate, feat.num_mel_bins, args.max_per_split)
    except (LabelError, ManifestError, FileNotFoundError) as exc:
        raise ProbeCLIError(str(exc)) from None
    except Exception as exc:  # an unreadable clip: name it, no traceback
        raise ProbeCLIError(f"cannot read the probe data: {exc}") from None
    logger.info("%d clips, %d classes, splits %s (%.1f s)", len(data), data.num_classes, data.split_names,
                time.perf_counter() - start)
    cropped = cropped_clips(data, feat.target_length or DEFAULT_TARGET_LENGTH)
    if cropped:
        logger.warning("%d of %d clips are longer than the input of %d frames and are cropped to their start%s",
                       cropped, len(data), feat.target_length or DEFAULT_TARGET_LENGTH,
                       "" if args.whole_clips else " (--whole-clips probes them whole)")

    rows = [] if args.no_logmel else probe_logmel(data, feat, l2_folds=args.l2_folds)
    for name, enc in encoders:
        t0 = time.perf_counter()
        layers = _layers(args.layers, len(enc.blocks))
        rows += probe_encoder(name, enc, data, feat, layers, poolings, pool_padding=args.pool_padding,
                              batch_size=args.batch_size, natural_length=args.natural_length,
                              l2_folds=args.l2_folds)
        logger.info("%s probed in %.1f s", name, time.perf_counter() - t0)
    chance = chance_level(data)
    print(format_table(rows))
    print(f"{len(data)} clips, {data.num_classes} classes, "
          + (f"leave-one-out over {len(data.split_names)} splits" if data.spec.folds else
             f"train {data.split_names[0]} / test {data.split_names[1]}")
          + f"; majority-class accuracy {100 * chance:.1f}%; input {feat.target_length} frames"
          + (" at most (each clip whole)" if args.whole_clips else "")
          + (" (each clip padded to a whole patch only)" if args.natural_length and not args.whole_clips else "")
          + (", padding pooled" if args.pool_padding else ", real frames pooled"))
    settings = {"data": os.path.abspath(args.data), "splits": data.split_names, "folds": bool(data.spec.folds),
                "feature_config": dict(feat.__dict__), "pool_padding": args.pool_padding,
                "natural_length": args.natural_length, "whole_clips": args.whole_clips,
                "checkpoints": [os.path.abspath(c) for c in args.checkpoints], "seed": args.seed,
                "l2_folds": args.l2_folds}
    result = {"settings": settings, "chance": chance, "rows": [r.as_dict() for r in rows]}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    apply_threads(parser, args.threads)
    try:
        run(args)
    except ProbeCLIError as exc:
        print(f"eat-probe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
