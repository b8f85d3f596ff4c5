"""Is a probe result more than one lucky seed? Combine runs of ``benchmarks/learning.py`` (or ``eat-probe
--json`` files) that differ only in the pre-training seed, paired speaker by speaker.

    python benchmarks/learning.py ... --out runs/seed1 --seed 1
    python benchmarks/learning.py ... --out runs/seed2 --seed 2
    python benchmarks/learning_seeds.py runs/seed1 runs/seed2 [--json runs/seeds.json]

Each argument is a run folder (its ``results.json``), a ``results.json`` or an ``eat-probe --json`` file,
probed on the same held-out splits with the random-init and log-mel rows (``--seed`` of learning.py
seeds pre-training and the random initialisation alike). Per encoder pooling and model (student,
teacher, random init) it takes each run's best block, as learning.py's summary does, and prints:
its accuracy per run and the mean over runs; and, per held-out split, the model's accuracy minus the
same run's random init and minus log-mel, averaged over runs, then the mean over splits, the standard
error of that mean (splits are the unit: a speaker that is hard for one seed is hard for all) and on
how many splits it is ahead. Seed-to-seed spread and split-to-split spread are both visible, so one
good seed cannot pass for a recipe.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning import summarize_by_pooling  # noqa: E402  (the same best-block rule)

MODELS = ("student", "teacher", "random-init")
REFERENCES = ("random-init", "logmel")


def load_probe(path: str) -> dict[str, Any]:
    """The ``eat-probe`` result (``settings``, ``rows``) of a learning.py run folder, its results.json,
    or an eat-probe json."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    probe = data.get("probe", data)
    if "rows" not in probe:
        raise ValueError(f"{path}: neither a learning.py results.json nor an eat-probe json (no 'rows')")
    return probe


def _splits(probe: dict[str, Any]) -> Optional[list[str]]:
    return probe.get("settings", {}).get("splits")


def _folds(row: dict[str, Any]) -> list[float]:
    if not row.get("logreg_folds"):
        raise ValueError(f"row {row['model']} / {row['pooling']} has no per-split accuracies (logreg_folds): "
                         "probe with held-out folds (eat-probe --folds auto)")
    return row["logreg_folds"]


def combine(probes: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pooling: {model: {"per_run", "mean", "vs": {reference: {"per_split", "mean", "sem", "ahead"}}}}}``
    over runs probed on the same splits (listed in the same order). Differences are paired within a run
    (its own random init and log-mel rows), then averaged over runs per split."""
    if not probes:
        raise ValueError("no runs to combine")
    splits = _splits(probes[0])
    for probe in probes[1:]:
        if _splits(probe) != splits:
            raise ValueError(f"the runs were probed on different splits: {splits} vs {_splits(probe)}")
    per_run = [summarize_by_pooling(p["rows"]) for p in probes]
    poolings = sorted(set.intersection(*(set(b) for b in per_run)))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pooling in poolings:
        bests = [b[pooling] for b in per_run]
        out[pooling] = {}
        for model in (*MODELS, "logmel"):
            if not all(model in b for b in bests):
                continue
            accs = [100 * b[model]["logreg"] for b in bests]
            entry: dict[str, Any] = {"per_run": accs, "mean": statistics.fmean(accs),
                                     "layers": [b[model]["layer"] for b in bests], "vs": {}}
            for ref in REFERENCES if model != "logmel" else ():
                if ref == model or not all(ref in b for b in bests):
                    continue
                diffs = [[100 * (m - r) for m, r in zip(_folds(b[model]), _folds(b[ref]))] for b in bests]
                per_split = [statistics.fmean(d) for d in zip(*diffs)]
                sem = statistics.stdev(per_split) / math.sqrt(len(per_split)) if len(per_split) > 1 else None
                entry["vs"][ref] = {"per_split": per_split, "mean": statistics.fmean(per_split), "sem": sem,
                                    "ahead": sum(d > 0 for d in per_split), "per_run": [statistics.fmean(d) for d in diffs]}
            out[pooling][model] = entry
    return out


def format_combined(combined: dict[str, dict[str, dict[str, Any]]], names: Sequence[str], splits: int) -> str:
    lines = [f"best block per run, logistic regression %; differences paired per split, mean over runs, "
             f"then mean over {splits} splits (standard error; splits ahead)"]
    header = f"{'pooling':<8} {'model':<12}" + "".join(f"{n[-12:]:>13}" for n in names) + f"{'mean':>7}"
    header += "".join(f"{'- ' + ref:>27}" for ref in REFERENCES)
    lines.append(header)
    for pooling, models in combined.items():
        for model, entry in models.items():
            cells = "".join(f"{a:13.1f}" for a in entry["per_run"]) + f"{entry['mean']:7.1f}"
            for ref in REFERENCES:
                vs = entry["vs"].get(ref)
                if vs is None:
                    cells += f"{'-':>27}"
                else:
                    sem = "-" if vs["sem"] is None else f"{vs['sem']:.1f}"
                    cells += f"{vs['mean']:+13.1f} ({sem}; {vs['ahead']} of {splits})".rjust(27)
            lines.append(f"{pooling:<8} {model:<12}{cells}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="learning.py run folders, results.json or eat-probe json files")
    p.add_argument("--json", default=None, help="write the combined numbers here")
    args = p.parse_args(argv)
    try:
        probes = [load_probe(path) for path in args.runs]
        combined = combine(probes)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = _splits(probes[0]) or []
    print(f"{len(probes)} runs; held-out splits: {', '.join(splits)}")
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(os.path.abspath(r))))
             for r in args.runs]  # the run folder names the run
    print(format_combined(combined, names, len(splits)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"runs": [os.path.abspath(r) for r in args.runs], "splits": splits, "combined": combined},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
