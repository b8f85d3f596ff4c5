"""How much of EAT's targets is constant over a clip, under each target normalisation?

    python experiments/utterance_target.py CHECKPOINT --data FSDD_SPK [--frames 128] [--per-split 20]

EAT's utterance target is the patch mean of the frame targets. The release normalises each teacher
block's FFN output per channel over the clip's patches (instance norm) before averaging the blocks and
LayerNorming each patch, which makes every channel's patch mean zero: what is constant over a clip
leaves the targets, and the utterance target is nearly the same for every clip. This script runs the
checkpoint's teacher on clips of a labelled manifest folder (each cropped or padded to ``--frames``)
and prints, for ``instance`` (the release) and ``layer`` (``model.target_norm=layer``): the mean
absolute value of the utterance target, its variance across clips, and that variance as a share of
the frame targets' variance across patches and clips (how much of the targets a clip's constant
part holds). ``--top-k``: the teacher blocks averaged (default all of them, as ``eat_small``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

import torch


def measure(checkpoint: str, data_dir: str, frames: int, per_split: int, top_k: Optional[int] = None
            ) -> list[dict[str, float]]:
    from eat_fairseq.data.features import pad_or_crop, to_window
    from eat_fairseq.evaluation.probe import load_probe_data
    from eat_fairseq.inference.api import load_model
    from eat_fairseq.model.objective import TARGET_NORMS, teacher_targets

    handle = load_model(checkpoint, use_teacher=True)
    teacher = handle.encoder.eval()
    top_k = top_k or len(teacher.blocks)
    data = load_probe_data(data_dir, "auto", max_per_split=per_split)
    window = dataclasses.replace(handle.feature_cfg, target_length=frames)
    fbank = to_window(torch.stack([pad_or_crop(fb, frames) for fb in data.fbank]), window)
    with torch.no_grad():
        _, ffn = teacher(fbank)
    rows = []
    for norm in TARGET_NORMS:
        y = teacher_targets(ffn, min(top_k, len(ffn)), norm=norm)  # (B, P, D)
        utt = y.mean(1)  # (B, D)
        frame_var = y.reshape(-1, y.shape[-1]).var(0).mean()
        rows.append({"norm": norm, "clips": y.shape[0], "top_k": min(top_k, len(ffn)),
                     "utterance_abs": utt.abs().mean().item(), "utterance_var": utt.var(0).mean().item(),
                     "clip_constant_share": (utt.var(0).mean() / frame_var).item()})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pre-training checkpoint (its EMA teacher is used)")
    p.add_argument("--data", required=True, help="labelled manifest folder (eat-probe's format)")
    p.add_argument("--frames", type=int, default=128, help="input frames per clip (default 128, eat_small's window)")
    p.add_argument("--per-split", type=int, default=20, help="clips per split (evenly spaced)")
    p.add_argument("--top-k", type=int, default=None,
                   help="teacher blocks averaged (the run's average_top_k_layers; default all, as eat_small)")
    args = p.parse_args(argv)
    rows = measure(args.checkpoint, args.data, args.frames, args.per_split, args.top_k)
    print(f"{'target norm':<12}{'clips':>6}{'K':>3}{'mean |utterance target|':>25}{'its variance across clips':>27}"
          f"{'share of frame-target variance':>32}")
    for r in rows:
        print(f"{r['norm']:<12}{r['clips']:>6}{r['top_k']:>3}{r['utterance_abs']:>25.3f}{r['utterance_var']:>27.4f}"
              f"{100 * r['clip_constant_share']:>31.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
