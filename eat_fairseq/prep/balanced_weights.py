"""Per-clip sampling weights for balanced sampling of a multi-label set (docs/reference.md section 4).

AudioSet's full training set is dominated by a few classes (Speech, Music); EAT fine-tunes on it with
weighted draws where a clip's weight is the sum over its labels of 1000 / (label count + 0.01), the
counts taken over the same split, so clips carrying rare labels are drawn more often.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from eat_fairseq.data.labels import parse_label_line
from eat_fairseq.prep.common import (
    ManifestReport,
    PrepError,
    SplitSummary,
    add_common_args,
    check_outputs,
    format_weights,
    new_parser,
    read_lines,
    run_cli,
    write_text_atomic,
)

HELP_EPILOG = """\
output: one float per line of LBL (same order), the weight of that clip:
  sum over the clip's distinct labels of 1000 / (count + 0.01), count = number of lines of LBL that
  carry the label. A clip without labels gets 0.0 (never drawn).
exit status: 0 written, 2 bad input or WEIGHTS exists (use --force)."""


def balanced_weights(label_lists: Sequence[Sequence[str]]) -> list[float]:
    """Weight of every clip: sum over its distinct labels of ``1000 / (count + 0.01)``.

    A label repeated within one clip counts once, both in the counts and in the sum. The same formula
    as training's fallback (:func:`eat_fairseq.data.sampling.balanced_weights`, on class indices; a
    test holds the two equal): this one works on label strings, so it needs no label descriptors.
    """
    distinct = [list(dict.fromkeys(labels)) for labels in label_lists]
    counts = Counter(label for labels in distinct for label in labels)
    return [sum(1000.0 / (counts[label] + 0.01) for label in labels) for labels in distinct]


def read_label_lists(path: str | os.PathLike) -> list[list[str]]:
    """Label lists of a ``.lbl`` file (``clip_id<TAB>label1,label2,...`` per line), read as training
    reads them (:func:`eat_fairseq.data.labels.parse_label_line`: names stripped, empty ones dropped)."""
    out = []
    for lineno, line in enumerate(read_lines(path), start=1):
        try:
            out.append(parse_label_line(line)[1])
        except ValueError:
            raise PrepError(f"{path}:{lineno}: expected clip_id<TAB>labels, found {line[:80]!r}") from None
    return out


def write_balanced_weights(labels: str | os.PathLike, out: str | os.PathLike,
                           force: bool = False) -> ManifestReport:
    """Write the weights of the clips of the ``labels`` file to ``out``, one per line."""
    out_p = Path(os.path.abspath(os.fspath(out)))
    check_outputs([out_p], force)
    try:
        weights = balanced_weights(read_label_lists(labels))
    except OSError as exc:
        raise PrepError(f"cannot read {labels}: {exc}") from exc
    report = ManifestReport(root=Path(os.path.abspath(os.fspath(labels))).parent, dest=out_p.parent)
    report.outputs.append(write_text_atomic(out_p, format_weights(weights)))
    report.splits[out_p.name] = SplitSummary(rows=len(weights))
    if any(w == 0.0 for w in weights):
        report.notes.append(f"{sum(w == 0.0 for w in weights)} clip(s) without labels have weight 0")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write balanced-sampling weights for the clips of a .lbl file.", HELP_EPILOG)
    parser.add_argument("labels", metavar="LBL", help="a {split}.lbl file")
    parser.add_argument("--out", required=True, metavar="WEIGHTS", help="output file, e.g. train.weights")
    add_common_args(parser, workers=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_balanced_weights(args.labels, args.out, force=args.force), all_or_nothing=True)
