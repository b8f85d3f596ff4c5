"""Is a probe result more than one lucky seed? Combine runs of ``experiments/learning.py`` (or ``eat-probe
--json`` files) that differ only in the pre-training seed, paired speaker by speaker.

    python experiments/learning.py ... --out runs/seed1 --seed 1
    python experiments/learning.py ... --out runs/seed2 --seed 2
    python experiments/learning_seeds.py runs/seed1 runs/seed2 [--json runs/seeds.json]
    python experiments/learning_seeds.py runs/change_s1 runs/change_s2 --against runs/seed1 runs/seed2

Each argument is a run folder (its ``results.json``), a ``results.json`` or an ``eat-probe --json`` file,
probed on the same held-out splits with the random-init and log-mel rows (``--seed`` of learning.py
seeds pre-training and the random initialisation alike). Per encoder pooling and model (student,
teacher, random init) it takes each run's best block, as learning.py's summary does, and prints:
its accuracy per run and the mean over runs; and, per held-out split, the model's accuracy minus the
same run's random init and minus log-mel, averaged over runs, then the mean over splits, the standard
error of that mean (splits are the unit: a speaker that is hard for one seed is hard for all) and on
how many splits it is ahead. Seed-to-seed spread and split-to-split spread are both visible, so one
good seed cannot pass for a recipe.

``--against`` compares a change with a base recipe over seeds (an ablation row): the i-th run of each
list must share the pre-training seed; per pooling and model the change's best block minus the base's,
per split, averaged over the seed pairs, with the same standard error over splits. A one-seed ablation
gain smaller than the seed-to-seed spread is what this guards against.
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


def _check_splits(probes: Sequence[dict[str, Any]]) -> None:
    splits = _splits(probes[0])
    for probe in probes[1:]:
        if _splits(probe) != splits:
            raise ValueError(f"the runs were probed on different splits: {splits} vs {_splits(probe)}")


def _paired_summary(diffs: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Differences per run (each a list over splits) -> averaged per split over runs, then their mean,
    standard error over splits and the number of splits ahead."""
    per_split = [statistics.fmean(d) for d in zip(*diffs)]
    sem = statistics.stdev(per_split) / math.sqrt(len(per_split)) if len(per_split) > 1 else None
    return {"per_split": per_split, "mean": statistics.fmean(per_split), "sem": sem,
            "ahead": sum(d > 0 for d in per_split), "per_run": [statistics.fmean(d) for d in diffs]}


def _paired_cell(summary: dict[str, Any], splits: int) -> str:
    """``+4.2 (2.3; 4 of 6)``: a paired summary's mean, standard error and splits ahead, 27 wide."""
    sem = "-" if summary["sem"] is None else f"{summary['sem']:.1f}"
    return f"{summary['mean']:+13.1f} ({sem}; {summary['ahead']} of {splits})".rjust(27)


def combine(probes: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pooling: {model: {"per_run", "mean", "vs": {reference: {"per_split", "mean", "sem", "ahead"}}}}}``
    over runs probed on the same splits (listed in the same order). Differences are paired within a run
    (its own random init and log-mel rows), then averaged over runs per split."""
    if not probes:
        raise ValueError("no runs to combine")
    _check_splits(probes)
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
                entry["vs"][ref] = _paired_summary(diffs)
            out[pooling][model] = entry
    return out


def compare_arms(runs: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]]
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pooling: {model: {"runs", "against", "per_split", "mean", "sem", "ahead", "per_run"}}}``: the
    change (``runs``) minus the base (``against``), the i-th run of each paired (same pre-training seed),
    each run at its best block; differences per split averaged over the pairs (``per_run``: per pair)."""
    if not runs or len(runs) != len(against):
        raise ValueError(f"--against needs one base run per run, paired by seed: {len(runs)} runs, "
                         f"{len(against)} base runs")
    _check_splits([*runs, *against])
    for i, (run, base) in enumerate(zip(runs, against)):
        seeds = run.get("settings", {}).get("seed"), base.get("settings", {}).get("seed")
        if None not in seeds and seeds[0] != seeds[1]:
            raise ValueError(f"pair {i + 1} has different seeds ({seeds[0]} vs {seeds[1]}): list the base runs "
                             "in the same seed order")
    run_bests = [summarize_by_pooling(p["rows"]) for p in runs]
    base_bests = [summarize_by_pooling(p["rows"]) for p in against]
    poolings = sorted(set.intersection(*(set(b) for b in (*run_bests, *base_bests))))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pooling in poolings:
        out[pooling] = {}
        for model in ("student", "teacher"):
            pairs = [(r[pooling].get(model), b[pooling].get(model)) for r, b in zip(run_bests, base_bests)]
            if any(r is None or b is None for r, b in pairs):
                continue
            diffs = [[100 * (x - y) for x, y in zip(_folds(r), _folds(b))] for r, b in pairs]
            entry = _paired_summary(diffs)
            entry["runs"] = [100 * r["logreg"] for r, _ in pairs]
            entry["against"] = [100 * b["logreg"] for _, b in pairs]
            out[pooling][model] = entry
    return out


def format_arms(arms: dict[str, dict[str, dict[str, Any]]], splits: int) -> str:
    lines = [f"change - base, paired by seed, best block of each run; mean over {splits} splits "
             "(standard error; splits ahead)",
             f"{'pooling':<8} {'model':<12}{'change':>8}{'base':>8}{'change - base':>27}"]
    for pooling, models in arms.items():
        for model, e in models.items():
            lines.append(f"{pooling:<8} {model:<12}{statistics.fmean(e['runs']):8.1f}"
                         f"{statistics.fmean(e['against']):8.1f}{_paired_cell(e, splits)}")
    return "\n".join(lines)


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
                cells += f"{'-':>27}" if vs is None else _paired_cell(vs, splits)
            lines.append(f"{pooling:<8} {model:<12}{cells}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="learning.py run folders, results.json or eat-probe json files")
    p.add_argument("--against", nargs="+", default=None, metavar="BASE_RUN",
                   help="base runs, one per run in the same seed order: print run - base per split")
    p.add_argument("--json", default=None, help="write the combined numbers here")
    args = p.parse_args(argv)
    arms = None
    try:
        probes = [load_probe(path) for path in args.runs]
        combined = combine(probes)
        if args.against:
            arms = compare_arms(probes, [load_probe(path) for path in args.against])
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = _splits(probes[0]) or []
    print(f"{len(probes)} runs; held-out splits: {', '.join(splits)}")
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(os.path.abspath(r))))
             for r in args.runs]  # the run folder names the run
    print(format_combined(combined, names, len(splits)))
    if arms is not None:
        print()
        print(format_arms(arms, len(splits)))
    if args.json:
        result = {"runs": [os.path.abspath(r) for r in args.runs], "splits": splits, "combined": combined}
        if arms is not None:
            result["against"] = {"runs": [os.path.abspath(r) for r in args.against], "combined": arms}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
