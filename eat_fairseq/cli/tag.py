"""``eat-tag``: top-k labels of audio files with a fine-tuned EAT checkpoint.

    eat-tag --checkpoint CKPT [--labels class_labels_indices.csv] [--top-k K] [--json]
            [--aggregate mean|max] [--batch-size B] [--device cpu|cuda] [--threads N]
            [--trust-checkpoint] [--no-progress] AUDIO...

CKPT may also be the ``.onnx`` file ``eat-export`` writes from a fine-tuned checkpoint (labels and
score type travel in its metadata).

AUDIO is an audio file or a folder (searched recursively). Scores are sigmoid probabilities for
multi-label models (AudioSet) and softmax probabilities for single-label ones (ESC-50), as the
checkpoint records. Clips longer than the model's window are scored per window and combined by
``--aggregate`` (``mean`` weighted by window length, or per-class ``max``).

Labels are the checkpoint's own (AudioSet: the ``/m/...`` ids). ``--labels`` adds display names
from a CSV: AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name`` with a header) or a
``label_descriptors.csv`` (``index,label[,name]``). Names are matched by label when every label of
the model appears in the file, else by index when the file has exactly one row per class.

Output: per file its path then one ``score  name (label)`` line per label; ``--json`` prints one JSON object
``{"results": {path: [{"index", "label", "name", "score"}, ...]}, "errors": {path: message}}``.
Unreadable files (missing, not a regular file, undecodable, shorter than 25 ms) are skipped and
reported; exit status 0 when every file was tagged, 1 when some file failed (the others are printed)
or the checkpoint has no classification head (a pre-training checkpoint), 2 for bad arguments (a
missing checkpoint file too). Uses only the pure core (no fairseq); torch is imported after the
arguments are parsed.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from eat_fairseq.cli.common import fail, plain_warnings
from eat_fairseq.cli.extract import (
    InputError,
    add_model_arguments,
    check_model_arguments,
    expand_inputs,
    load_for_cli,
    progress,
    report_errors,
    run_batches,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-tag",
        description="Tag audio files with a fine-tuned EAT checkpoint.",
        epilog="exit status: 0 every file tagged, 1 some file failed or the checkpoint has no classification "
        "head, 2 bad arguments",
    )
    parser.add_argument("audio", nargs="+", metavar="AUDIO", help="audio file or folder")
    parser.add_argument(
        "--checkpoint", required=True, help="fine-tuned EAT checkpoint (ours, converted or released) or its eat-export .onnx"
    )
    parser.add_argument("--labels", default=None, help="CSV with display names (class_labels_indices.csv)")
    parser.add_argument("--top-k", type=int, default=5, help="labels per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--aggregate", choices=("mean", "max"), default="mean", help="how per-window scores of long clips combine"
    )
    add_model_arguments(parser, "scored")
    return parser


def display_names(model_labels: list[str], path: str) -> tuple[list[str], Optional[str]]:
    """Display name per class from a labels CSV, plus a note on how they were matched (or None).

    Raises :class:`~eat_fairseq.data.labels.LabelError` when the file fits the model neither by
    label nor by index.
    """
    from eat_fairseq.data.labels import LabelError, read_label_descriptors

    label_set = read_label_descriptors(path)
    by_label = dict(zip(label_set.labels, label_set.display_names))
    if all(label in by_label for label in model_labels):
        return [by_label[label] for label in model_labels], None
    if len(label_set) == len(model_labels):
        note = f"{path}: labels do not match the checkpoint's, names matched by class index"
        return list(label_set.display_names), note
    raise LabelError(
        f"{path}: {len(label_set)} labels that do not match the checkpoint's {len(model_labels)} classes"
    )


@plain_warnings("eat-tag")
def main(argv: Optional[list[str]] = None) -> int:
    """Run ``eat-tag``; returns the exit status (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    check_model_arguments(parser, args)
    try:
        items, _ = expand_inputs(args.audio, manifests=False)
    except InputError as exc:
        return fail(prog, str(exc), 2)
    if not items:
        return fail(prog, f"no audio files found in {args.audio}", 1)
    import numpy as np

    from eat_fairseq.data.labels import LabelError

    handle = load_for_cli(args, prog)
    if handle is None:
        return 1
    if handle.labels is None:
        print(
            f"{prog}: error: {args.checkpoint} is a {handle.kind} checkpoint without a classification head; "
            "eat-tag needs a fine-tuned checkpoint (use eat-extract for embeddings)",
            file=sys.stderr,
        )
        return 1
    names = list(handle.labels)
    if args.labels:
        try:
            names, note = display_names(handle.labels, args.labels)
        except LabelError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        if note:
            print(f"{prog}: note: {note}", file=sys.stderr)
    top_k = min(args.top_k, len(handle.labels))

    def compute(waves: list[Any]) -> list[Any]:
        return handle.predict_scores(waves, sample_rate=handle.sample_rate, aggregate=args.aggregate)

    results: dict[str, list[dict[str, Any]]] = {}
    errors: list[tuple[str, str]] = []
    with progress(len(items), prog, enabled=not args.no_progress) as bar:
        for item, scores, error in run_batches(handle, items, compute, args.batch_size, bar):
            if error is not None:
                errors.append((item.path, error))
                continue
            order = np.argsort(-scores, kind="stable")[:top_k]
            results[item.path] = [
                {"index": int(i), "label": handle.labels[i], "name": names[i], "score": float(scores[i])} for i in order
            ]
            if not args.json:
                print(item.path)
                for entry in results[item.path]:
                    shown = entry["name"] if entry["name"] == entry["label"] else f"{entry['name']} ({entry['label']})"
                    print(f"  {entry['score']:.4f}  {shown}")
                sys.stdout.flush()
    if args.json:
        print(json.dumps({"results": results, "errors": dict(errors)}, indent=2, ensure_ascii=False))
    report_errors(errors, None, len(items), prog)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
