"""``eat-evaluate``: score a fine-tuned EAT checkpoint on a labelled split.

    eat-evaluate --checkpoint ckpt/checkpoint_best.pt --data DIR --split eval [--batch-size 32]
                 [--device cpu|cuda] [--out per_class_ap.tsv] [--num-workers 2]

Loads the checkpoint through fairseq (task ``eat_classification``, model ``eat_classifier``) with
the project's safe loader, runs batched inference (no augmentation), prints mAP / accuracy / AUC as
JSON on the last line, and writes per-class AP (with label names) to ``--out``
(default ``per_class_ap_{split}.tsv`` next to the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger("eat_fairseq.evaluate")


def _progress(iterable: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="evaluating", unit="batch", file=sys.stderr)


def load_for_evaluation(checkpoint: str, data: str) -> tuple[Any, Any]:
    """(model in eval mode, task) from a fine-tuned checkpoint, with ``task.data`` pointed at ``data``."""
    import eat_fairseq  # noqa: F401  (registers the fairseq components)
    import eat_fairseq.fairseq_ext.classification  # noqa: F401  (in case the package import did not)
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf, open_dict

    from eat_fairseq.fairseq_ext.classification import load_trusted_state

    state = load_trusted_state(checkpoint)
    if "cfg" not in state or state["cfg"] is None:
        raise ValueError(f"{checkpoint}: not a fairseq checkpoint (no 'cfg')")
    cfg = OmegaConf.create(state["cfg"]) if not OmegaConf.is_config(state["cfg"]) else state["cfg"]
    task_name = str(cfg.task.get("_name", ""))
    if task_name != "eat_classification":
        raise ValueError(f"{checkpoint}: task is {task_name!r}, expected a fine-tuned 'eat_classification' checkpoint")
    with open_dict(cfg):
        cfg.task.data = os.path.abspath(data)
        cfg.task.per_class_ap_dir = None
        # evaluation is deterministic whatever split is named (even the training one)
        cfg.task.roll_and_gain = False
        cfg.task.noise_and_roll = False
        cfg.task.balanced_sampling = False
    state["cfg"] = cfg
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], state=state)
    return models[0].eval(), task


@torch.no_grad()
def evaluate(
    checkpoint: str,
    data: str,
    split: str = "eval",
    batch_size: int = 32,
    device: str = "cpu",
    out: Optional[str] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate and return ``{"mAP", "accuracy", "auc", "clips", "per_class_ap_file"}``."""
    from eat_fairseq.core.metrics import evaluate_predictions, write_per_class_ap

    model, task = load_for_evaluation(checkpoint, data)
    model.to(device)
    task.load_dataset(split)
    dataset = task.dataset(split)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=dataset.collater,
        num_workers=num_workers,
    )
    multi_label = bool(task.cfg.multi_label)
    all_scores, all_targets = [], []
    for batch in _progress(loader, len(loader), progress):
        if not batch:
            continue
        logits = model(batch["net_input"]["source"].to(device)).float()
        scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
        all_scores.append(scores.cpu().numpy())
        all_targets.append(batch["target"].numpy())
    if not all_scores:
        raise RuntimeError(f"no clip of split {split!r} could be evaluated")
    scores_np = np.concatenate(all_scores)
    targets_np = np.concatenate(all_targets)
    report = evaluate_predictions(targets_np, scores_np, task.num_classes)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"per_class_ap_{split}.tsv")
    write_per_class_ap(out, report, task.label_set.labels, task.label_set.display_names)
    return {
        "mAP": report.mAP,
        "accuracy": report.accuracy,
        "auc": report.auc,
        "clips": int(len(scores_np)),
        "per_class_ap_file": out,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eat-evaluate", description="Evaluate a fine-tuned EAT checkpoint (mAP, accuracy, AUC, per-class AP)."
    )
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (eat_classification task)")
    parser.add_argument("--data", required=True, help="folder with {split}.tsv and {split}.lbl")
    parser.add_argument("--split", default="eval", help="split name (default: eval)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="per-class AP TSV (default: next to the checkpoint)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    result = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    print(f"{args.split}: {result['clips']} clips  mAP {result['mAP']:.4f}  accuracy {result['accuracy']:.4f}  "
          f"AUC {result['auc']:.4f}")
    print(f"per-class AP: {result['per_class_ap_file']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
