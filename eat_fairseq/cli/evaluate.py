"""``eat-evaluate``: score a fine-tuned EAT checkpoint on a labelled split.

    eat-evaluate --checkpoint ckpt/checkpoint_best.pt --data DIR [--split NAME] [--batch-size 32]
                 [--device cpu|cuda] [--threads N] [--out per_class_ap.tsv] [--num-workers 2]

Loads the checkpoint through fairseq (task ``eat_classification``, model ``eat_classifier``) with
the project's safe loader, runs batched inference (no augmentation), prints mAP / accuracy / AUC as
JSON on the last line, and writes per-class AP (with label names) to ``--out``
(default ``per_class_ap_{split}.tsv`` next to the checkpoint). ``--split`` defaults to the split the
checkpoint was validated on during fine-tuning (``dataset.valid_subset``: ``valid`` for the
``manifests/`` preparers' folders, ``eval`` for AudioSet and ESC-50 folds).

Every user mistake is one line on stderr, not a traceback. Exit status (as the manifest tools):
0 evaluated; 1 no clip could be evaluated (an unreadable audio file stops the run, named);
2 bad arguments or inputs (missing or unusable checkpoint, data folder, split, labels, manifest).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

from eat_fairseq._registration import import_layer_quietly
from eat_fairseq.cli.common import add_threads_argument, apply_threads, checkpoint_message, device_error, fail

logger = logging.getLogger("eat_fairseq.evaluate")


class UsageError(ValueError):
    """A bad argument or input (exit status 2)."""


def _progress(iterable: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="evaluating", unit="batch", file=sys.stderr)


def read_finetuned_state(checkpoint: str) -> dict:
    """The checkpoint's state (restricted loader), checked to be a fine-tuned ``eat_classification`` one.

    Raises :class:`UsageError` naming the file for a missing, unreadable, unsafe or non-fine-tuned file.
    """
    if not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    import_layer_quietly()
    from omegaconf import OmegaConf

    from eat_fairseq.checkpoints.convert import ConversionError, load_ours
    from eat_fairseq.checkpoints.load import CheckpointError

    try:
        state = load_ours(checkpoint)
    except (CheckpointError, ConversionError) as exc:
        raise UsageError(f"cannot load {checkpoint}: {checkpoint_message(exc)}") from exc
    if not state.get("cfg"):
        raise UsageError(f"{checkpoint}: not a fairseq checkpoint (no 'cfg'); eat-evaluate needs a fine-tuned one")
    cfg = OmegaConf.create(state["cfg"]) if not OmegaConf.is_config(state["cfg"]) else state["cfg"]
    task_name = str((cfg.get("task") or {}).get("_name", ""))
    if task_name != "eat_classification":
        raise UsageError(
            f"{checkpoint}: task is {task_name!r}, expected a fine-tuned 'eat_classification' checkpoint "
            "(pre-training checkpoints have no classifier; fine-tune first)"
        )
    state["cfg"] = cfg
    return state


def default_split(state: dict) -> str:
    """The split the checkpoint was validated on while fine-tuning (first of ``dataset.valid_subset``)."""
    subsets = str((state["cfg"].get("dataset") or {}).get("valid_subset") or "valid")
    return subsets.split(",")[0].strip() or "valid"


def check_split(data: str, split: str) -> None:
    """Raise :class:`UsageError` unless ``data`` holds ``{split}.tsv`` (listing the splits it does hold)."""
    if not os.path.isdir(data):
        raise UsageError(f"--data {data} is not a folder")
    if not os.path.isfile(os.path.join(data, f"{split}.tsv")):
        found = sorted(name[:-4] for name in os.listdir(data) if name.endswith(".tsv") and name != "excluded.tsv")
        raise UsageError(
            f"no split {split!r} in {data} (no {split}.tsv); splits there: {', '.join(found) or 'none'}"
        )


def load_for_evaluation(checkpoint: str, data: str, state: Optional[dict] = None) -> tuple[Any, Any]:
    """(model in eval mode, task) from a fine-tuned checkpoint, with ``task.data`` pointed at ``data``."""
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    state = state if state is not None else read_finetuned_state(checkpoint)
    cfg = state["cfg"]
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


def evaluate(
    checkpoint: str,
    data: str,
    split: Optional[str] = None,
    batch_size: int = 32,
    device: str = "cpu",
    out: Optional[str] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate and return ``{"split", "mAP", "accuracy", "auc", "clips", "per_class_ap_file"}``.

    ``split`` None means the checkpoint's own validation split. Raises :class:`UsageError` for bad
    inputs (see the module docstring).
    """
    import numpy as np
    import torch

    from eat_fairseq.data.labels import LabelError
    from eat_fairseq.data.manifest import ManifestError
    from eat_fairseq.evaluation.metrics import evaluate_predictions, write_per_class_ap

    state = read_finetuned_state(checkpoint)
    split = split or default_split(state)
    check_split(data, split)
    try:
        model, task = load_for_evaluation(checkpoint, data, state)
        task.load_dataset(split)
    except (LabelError, ManifestError) as exc:
        raise UsageError(str(exc)) from exc
    model.to(device)
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
    with torch.no_grad():
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
        "split": split,
        "mAP": report.mAP,
        "accuracy": report.accuracy,
        "auc": report.auc,
        "clips": int(len(scores_np)),
        "per_class_ap_file": out,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-evaluate",
        description="Evaluate a fine-tuned EAT checkpoint (mAP, accuracy, AUC, per-class AP).",
        epilog="exit status: 0 evaluated, 1 no clip could be evaluated, 2 bad arguments or inputs",
    )
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (eat_classification task)")
    parser.add_argument("--data", required=True, help="folder with {split}.tsv and {split}.lbl")
    parser.add_argument(
        "--split", default=None, help="split name (default: the split the checkpoint was validated on, e.g. valid)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_argument(parser)
    parser.add_argument("--out", default=None, help="per-class AP TSV (default: next to the checkpoint)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    apply_threads(parser, args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from eat_fairseq.data.audio import AudioError

    try:
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
    except UsageError as exc:
        return fail(prog, str(exc), 2)
    except (AudioError, RuntimeError, OSError) as exc:
        return fail(prog, " ".join(str(exc).split()) or type(exc).__name__, 1)
    print(f"{result['split']}: {result['clips']} clips  mAP {result['mAP']:.4f}  accuracy {result['accuracy']:.4f}  "
          f"AUC {result['auc']:.4f}")
    print(f"per-class AP: {result['per_class_ap_file']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
