"""``eat-plot``: the training curves of a run folder as a PNG.

    eat-plot RUN_DIR [--out curves.png] [--title TEXT]

RUN_DIR is a run's checkpoint folder (the recipes write TensorBoard logs to ``{save_dir}/tb``), any
folder holding event files, or a folder with / the path of a fairseq text log (``hydra_train.log``).
Panels: loss terms, learning rate, validation metrics (accuracy, mAP, AUC), ``probe_*`` scalars
(accuracies and diagnostics apart) and the pre-training target / prediction variance, each drawn when
present (:mod:`eat_fairseq.cli.curves`). With an online probe it also prints, for each of its scores,
the first update (and minute) at which it rose above the log-mel baseline. Needs matplotlib (``pip install eat_fairseq[plot]``).

Exit status: 0 written; 1 nothing to plot or matplotlib missing; 2 RUN_DIR does not exist.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from eat_fairseq.cli.common import fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-plot",
        description="Draw the training curves (loss terms, lr, validation metrics, probe_* scalars) of a run "
        "folder into a PNG. Reads TensorBoard event files, else fairseq's text log.",
        epilog="exit status: 0 written, 1 nothing to plot or matplotlib missing, 2 RUN_DIR does not exist",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="checkpoint folder, TensorBoard log folder or fairseq log file")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the run's path)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if not os.path.exists(args.run):
        return fail(prog, f"{args.run}: no such file or folder", 2)
    out = args.out or os.path.join(args.run if os.path.isdir(args.run) else os.path.dirname(args.run) or ".", "curves.png")
    from eat_fairseq.cli.curves import plot_run

    try:
        summary = plot_run(args.run, out, title=args.title)
    except ImportError as exc:
        return fail(prog, f"drawing needs matplotlib ({exc}); pip install 'eat_fairseq[plot]'", 1)
    except (OSError, ValueError) as exc:
        return fail(prog, str(exc), 1)
    print(f"{prog}: wrote {summary['out']} ({summary['points']} points from the {summary['source']})")
    for panel, labels in summary["panels"].items():
        print(f"  {panel}: {', '.join(labels)}")
    for crossing in summary["crossings"]:
        print(f"  online probe: {crossing.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
