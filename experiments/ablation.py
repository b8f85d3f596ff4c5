"""Which parts of EAT matter at a user's scale? Pre-train variants of a recipe, probe each on several
held-out labelled sets, and tabulate them against the base recipe, random init and log-mel.

    # once: the unlabelled pool (experiments/learning.py's docstring) and labelled sets, each a manifest
    # folder with one split per held-out group (speaker, kit, source): manifests/fsdd.py --split-by
    # speaker, and the experiments/build_*.py tools
    python experiments/ablation.py run --pool /data/pool_w128 --out runs/ablation \\
        --set fsdd=/data/fsdd_speakers --set drums=/data/heldout/drums/manifests ... \\
        --variants base,frame_only,utterance_only --seeds 1,2 --max-update 5500 --jobs 2
    python experiments/ablation.py table runs/ablation [--markdown FILE]

``run`` pre-trains every (variant, seed) with ``experiments/learning.py``'s pre-training step
(``fairseq-hydra-train`` on the recipe plus the variant's overrides, ``common.seed`` = seed, warm-up
10% of the run's updates as in the recipe, the EMA annealed over the run), one
thread per job and ``--jobs`` jobs at a time, then runs ``eat-probe`` on the final checkpoint for each
set: the student, every block, poolings ``freq``, ``freqstd`` and ``mean``, each clip whole
(``--whole-clips``), leave-one-split-out, beside the same architecture at random initialisation (the
same seed) and the log-mel baseline. A finished (variant, seed) is skipped when run again, so an
interrupted screen continues where it stopped (a run killed mid-way resumes from its last
checkpoint with the update count it started with, kept in ``plan.json``), and sets added later are
probed on the finished runs.

Variants (``VARIANTS``) are named sets of hydra overrides. Those that change the cost of an update
(mask ratio, clone count, decoder) are meant for equal wall time: give ``--minutes-per-run`` and each
run's ``max_update`` is set from its own measured seconds per update (a 60-update timing run first),
so every schedule finishes; or give ``--equal-time`` and each runs ``--max-update`` scaled by the
base's seconds per update over its own, both timed back to back (a machine shared with other jobs
slows both alike, so the ratio holds where a minute count would not). The others run
``--max-update`` updates. The table says which.

``table`` prints, per set and variant: the student's accuracy (logistic regression, best block and
last block, mean over seeds) per pooling, and its difference to random init, to log-mel and to the
base variant, paired per split and seed, as mean (standard error over splits; splits ahead)
(``experiments/learning_seeds.py``'s rules).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning import ROOT, _run, _tool, pretrain  # noqa: E402
from learning_seeds import _paired_cell, compare_arms, combine  # noqa: E402

POOLINGS = ("freq", "freqstd", "mean")
# name -> (hydra overrides, changes the cost of an update)
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "base": ((), False),
    "mask0.6": (("model.mask_prob=0.6",), True),
    "mask0.7": (("model.mask_prob=0.7",), True),
    "mask0.9": (("model.mask_prob=0.9",), True),
    "frame_only": (("model.utterance_loss_weight=0.0",), False),
    "utterance_only": (("model.frame_loss_weight=0.0",), False),
    "random_mask": (("model.mask_type=random",), False),
    # eat_small's 8 x 8 grid gets no blocks of 5 (the recipe's masks are random, MaskSpec.blocks_per_row);
    # blocks of 2 keep the inverse block structure at this scale (4 blocks, 12 visible patches)
    "blocks2": (("model.mask_length=2",), False),
    "layer_targets": (("model.target_norm=layer",), False),
    "linear_decoder": (("model.decoder_type=linear",), True),
    "mlp_decoder": (("model.decoder_type=mlp",), True),
    "transformer_decoder": (("model.decoder_type=transformer",), True),
    "clone1": (("model.clone_batch=1",), True),
    "clone16": (("model.clone_batch=16",), True),
}


def _run_dir(out: str, variant: str, seed: int) -> str:
    return os.path.join(out, variant, f"seed{seed}")


def _seconds_per_update(args: argparse.Namespace, overrides: Sequence[str], run_dir: str,
                        env: dict[str, str]) -> float:
    """Seconds per update of a variant: a 60-update run, timed from fairseq's log between updates 20
    and 60 (start-up left out)."""
    timing = os.path.join(run_dir, "timing")
    os.makedirs(timing, exist_ok=True)
    ns = SimpleNamespace(recipe=args.recipe, pool=args.pool, seed=1, resume=False, probe_every=0, probe_data=None,
                         max_update=60, budget_minutes=None,
                         set=[*overrides, "common.log_interval=20", "checkpoint.no_save=true"])
    start = time.perf_counter()
    pretrain(ns, timing, env)
    seconds = time.perf_counter() - start
    with open(os.path.join(timing, "pretrain.log"), encoding="utf-8") as log:
        stamps = [line for line in log if "num_updates=" in line and "wall=" in line]
    return _log_rate(stamps, seconds)


def _log_rate(lines: list[str], fallback: float) -> float:
    """Seconds per update between the first and last logged update (fairseq's ``wall`` field)."""
    points = []
    for line in lines:
        parts = {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in line.replace("|", ",").split(",")
                                                   if "=" in p)}
        if "num_updates" in parts and "wall" in parts:
            points.append((float(parts["num_updates"]), float(parts["wall"])))
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return fallback / 60.0
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def run_one(args: argparse.Namespace, variant: str, seed: int) -> str:
    """Pre-train one (variant, seed) unless it is done, then probe it on every set not probed yet;
    returns its folder. Running again after adding a set probes the finished runs on it only."""
    run_dir = _run_dir(args.out, variant, seed)
    done = os.path.join(run_dir, "run.json")
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if os.path.exists(done):
        with open(done, encoding="utf-8") as handle:
            record = json.load(handle)
    else:
        overrides, costly = VARIANTS[variant]
        max_update = args.max_update
        rate = None
        base_rate = None
        plan_path = os.path.join(run_dir, "plan.json")
        planned = os.path.exists(plan_path)
        if planned:
            # a run killed mid-way resumes with the update count it started with: timing it again on a
            # machine under another load would change its schedule (warm-up, EMA, rates) half way
            with open(plan_path, encoding="utf-8") as handle:
                plan = json.load(handle)
            max_update, rate = plan["max_update"], plan["seconds_per_update"]
            base_rate = plan["base_seconds_per_update"]
            message = f"resuming {variant} seed {seed} with the {max_update} updates it was planned with ({plan_path})"
            asked = plan.get("asked_max_update", args.max_update)  # plans written before it was recorded: unknown
            if asked != args.max_update:
                message += (f"; --max-update {args.max_update} differs from the {asked} it was started with"
                            " and applies to new runs only")
            print(message, flush=True)
        elif costly and args.equal_time:
            if not args.max_update:
                raise SystemExit("--equal-time needs --max-update (the base variant's updates)")
            # back to back in the same job, so both see the same load on the machine
            rate = _seconds_per_update(args, overrides, run_dir, env)
            base_rate = _seconds_per_update(args, (), os.path.join(run_dir, "base_timing"), env)
            max_update = max(100, round(args.max_update * base_rate / rate))
        elif costly and args.minutes_per_run:
            rate = _seconds_per_update(args, overrides, run_dir, env)
            max_update = max(100, int(args.minutes_per_run * 60 / rate))
        if not planned:
            _write(plan_path, {"max_update": max_update, "seconds_per_update": rate,
                               "base_seconds_per_update": base_rate, "asked_max_update": args.max_update})
        extra = [f"model.ema_anneal_end_step={max_update}"] if max_update else []
        ns = SimpleNamespace(recipe=args.recipe, pool=args.pool, seed=seed, resume=os.path.exists(
            os.path.join(run_dir, "pretrain", "checkpoint_last.pt")), probe_every=0, probe_data=None,
            max_update=max_update, budget_minutes=None, set=[*args.override, *overrides, *extra])
        if max_update and args.warmup_fraction:
            ns.set.append(f"lr_scheduler.warmup_updates={int(round(args.warmup_fraction * max_update))}")
        _, seconds = pretrain(ns, run_dir, env)
        record = {"variant": variant, "seed": seed, "overrides": list(ns.set), "max_update": max_update,
                  "equal": "wall time" if rate else "updates", "seconds_per_update": rate,
                  "base_seconds_per_update": base_rate,
                  "pretrain_seconds": seconds, "threads": args.threads, "probes": {},
                  "date": time.strftime("%Y-%m-%d %H:%M"),
                  "recipe": os.path.relpath(os.path.abspath(args.recipe), ROOT)}
        _write(done, record)
    ckpt = os.path.join(run_dir, "pretrain", "checkpoint_last.pt")
    for name, data in args.sets:
        if name in record["probes"]:
            continue
        path = os.path.join(run_dir, f"probe_{name}.json")
        cmd = [_tool("eat-probe"), ckpt, "--data", os.path.abspath(data), "--folds", "auto", "--layers", "all",
               "--pooling", ",".join(POOLINGS), "--whole-clips", "--random-init", "--seed", str(seed),
               "--json", path]
        if args.max_per_split:
            cmd += ["--max-per-split", str(args.max_per_split)]
        probe_seconds = _run(cmd, os.path.join(run_dir, f"probe_{name}.log"), env)
        record["probes"][name] = {"json": os.path.basename(path), "seconds": probe_seconds,
                                  "max_per_split": args.max_per_split}
        _write(done, record)
    return run_dir


def _write(path: str, record: dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    os.replace(path + ".tmp", path)


def cmd_run(args: argparse.Namespace) -> int:
    args.sets = [tuple(s.split("=", 1)) for s in args.set]
    if not args.sets or any(len(s) != 2 for s in args.sets):
        raise SystemExit("--set NAME=DIR, at least one")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out = os.path.abspath(args.out)
    jobs = [(v, s) for s in seeds for v in variants]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, args, v, s): (v, s) for v, s in jobs}
        failed = 0
        for future in concurrent.futures.as_completed(futures):
            v, s = futures[future]
            try:
                print(f"done: {v} seed {s} -> {future.result()}", flush=True)
            except Exception as exc:  # one failed run does not stop the others
                failed += 1
                print(f"FAILED: {v} seed {s}: {exc}", flush=True)
    return 1 if failed else 0


def _load(out: str) -> dict[str, dict[int, dict[str, Any]]]:
    """``{variant: {seed: run.json record with "probe" = {set: eat-probe json}}}`` of finished runs."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in sorted(os.listdir(out)):
        vdir = os.path.join(out, variant)
        if not os.path.isdir(vdir):
            continue
        for name in sorted(os.listdir(vdir)):
            record_path = os.path.join(vdir, name, "run.json")
            if not os.path.exists(record_path):
                continue
            with open(record_path, encoding="utf-8") as handle:
                record = json.load(handle)
            record["probe"] = {}
            for set_name, info in record["probes"].items():
                with open(os.path.join(vdir, name, info["json"]), encoding="utf-8") as handle:
                    record["probe"][set_name] = json.load(handle)
            runs.setdefault(variant, {})[int(record["seed"])] = record
    return runs


def _last_block(probe: dict[str, Any], pooling: str) -> Optional[float]:
    rows = [r for r in probe["rows"] if r["model"].endswith(":student") and r["pooling"] == pooling]
    return 100 * max(rows, key=lambda r: r["layer"])["logreg"] if rows else None


def tabulate(out: str) -> tuple[str, dict[str, Any]]:
    """The tables (markdown) and the numbers behind them."""
    runs = _load(out)
    if not runs:
        raise SystemExit(f"{out}: no finished runs")
    sets = sorted({s for v in runs.values() for r in v.values() for s in r["probe"]})
    lines = [f"Runs in `{out}`: " + "; ".join(f"{v}: seeds {sorted(r)}" for v, r in runs.items()), ""]
    numbers: dict[str, Any] = {}
    base_combined: dict[str, tuple[list[int], dict[str, Any]]] = {}
    for set_name in sets:
        lines += [f"### {set_name}", "",
                  "| variant | equal | seeds | pooling | student best | student last | random init | log-mel "
                  "| - random init | - log-mel | - base |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = runs.get("base", {})
        for variant, by_seed in runs.items():
            seeds = sorted(s for s, r in by_seed.items() if set_name in r["probe"])
            if not seeds:
                continue
            probes = [by_seed[s]["probe"][set_name] for s in seeds]
            combined = combine(probes)
            if variant == "base":
                base_combined[set_name] = (seeds, combined)
            splits = len(probes[0]["settings"]["splits"])
            arms = None
            if variant != "base" and all(s in base and set_name in base[s]["probe"] for s in seeds):
                arms = compare_arms(probes, [base[s]["probe"][set_name] for s in seeds])
            equal = by_seed[seeds[0]]["equal"]
            for pooling in POOLINGS:
                entry = combined.get(pooling, {})
                stu, rnd, mel = entry.get("student"), entry.get("random-init"), entry.get("logmel")
                if stu is None:
                    continue
                last = [_last_block(p, pooling) for p in probes]
                cells = [variant, equal, ",".join(map(str, seeds)), pooling, f"{stu['mean']:.1f}",
                         f"{statistics.fmean(last):.1f}", f"{rnd['mean']:.1f}" if rnd else "-",
                         f"{mel['mean']:.1f}" if mel else "-"]
                for ref in ("random-init", "logmel"):
                    vs = stu["vs"].get(ref)
                    cells.append(_paired_cell(vs, splits).strip() if vs else "-")
                arm = arms.get(pooling, {}).get("student") if arms else None
                cells.append(_paired_cell(arm, splits).strip() if arm else "-")
                lines.append("| " + " | ".join(cells) + " |")
                numbers.setdefault(set_name, {}).setdefault(variant, {})[pooling] = {
                    "seeds": seeds, "student": stu, "student_last": last, "base": arm}
        lines.append("")
    lines.append("Accuracy: logistic regression, %, mean over held-out splits and seeds; best = the best block "
                 "of each run. Differences are paired per split and seed: mean (standard error over splits; "
                 "splits ahead).")
    if base_combined:
        lines += ["", *per_seed_lines(base_combined)]
    crossing = crossing_lines(out, runs)
    if crossing:
        lines += ["", *crossing]
    return "\n".join(lines), numbers


def _when(update: Optional[int], first_probe: int) -> str:
    """An update for the crossing table: ``<= N`` at the first probe (it passed at or before it)."""
    if update is None:
        return "-"
    return f"<= {update}" if update == first_probe else str(update)


def _minutes(value: Optional[float]) -> str:
    return f"{value:.0f}" if value is not None else "-"


def crossing_lines(out: str, runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """When each run's online probe (the student's logistic regression) first rose above the log-mel
    baseline (``eat_fairseq.cli.curves.baseline_crossings`` on the run's TensorBoard or text log).
    Runs without an online probe are left out."""
    from eat_fairseq.cli.curves import baseline_crossings, read_run

    rows = []
    for variant, by_seed in runs.items():
        for seed, record in sorted(by_seed.items()):
            folder = os.path.join(out, variant, f"seed{seed}", "pretrain")
            try:
                found = baseline_crossings(read_run(folder))
            except (OSError, ValueError):
                continue
            crossing = next((c for c in found if c.probe == "probe_student_logreg"), None)
            if crossing is None:
                continue
            interval = next((o.split("=", 1)[1] for o in record.get("overrides", [])
                             if o.startswith("task.probe_interval_updates=")), "?")
            first = (_when(crossing.update, crossing.first_probe) if crossing.update is not None
                     else f"not by {record.get('max_update', '?')}")
            rows.append(f"| {variant} | {seed} | {interval} | {100 * crossing.baseline:.1f} | {first} "
                        f"| {_minutes(crossing.minutes)} | {100 * crossing.value:.1f} "
                        f"| {_when(crossing.settled, crossing.first_probe)} | {_minutes(crossing.settled_minutes)} |")
    if not rows:
        return []
    return ["### online probe: first update above log-mel", "",
            "| variant | seed | probe every | log-mel | first above | wall minutes | student then "
            "| above from then on | wall minutes |",
            "|---|---|---|---|---|---|---|---|---|", *rows, "",
            "The online probe of the run (its set, block and pooling: the run's `task.probe_*` settings), "
            "logistic regression, %; `<= N`: above at the first probe; above from then on: the first probe "
            "after which none fell back to log-mel or below. Wall minutes: fairseq's clock at that update, "
            "the probes' time and any other load on the machine included."]


def per_seed_lines(base_combined: dict[str, tuple[list[int], dict[str, Any]]]) -> list[str]:
    """The issue's target, seed by seed: does each pre-training seed of the base recipe beat random init
    (same readout, same seed) and log-mel on every set? ``base_combined``: set -> (seeds, ``combine``'s
    result). Per seed the difference is its mean over the held-out splits (best block against best
    block), so one lucky seed cannot carry the others."""
    lines = ["### base: each seed against random init and log-mel", "",
             "| set | pooling | seeds | - random init, per seed | - log-mel, per seed | every seed ahead of both |",
             "|---|---|---|---|---|---|"]
    for set_name, (seeds, combined) in base_combined.items():
        for pooling in POOLINGS:
            student = combined.get(pooling, {}).get("student")
            if not student or not all(ref in student["vs"] for ref in ("random-init", "logmel")):
                continue
            per_ref = [student["vs"][ref]["per_run"] for ref in ("random-init", "logmel")]
            ahead = all(d > 0 for diffs in per_ref for d in diffs)
            cells = [set_name, pooling, ",".join(map(str, seeds)),
                     *(" / ".join(f"{d:+.1f}" for d in diffs) for diffs in per_ref), "yes" if ahead else "no"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def cmd_table(args: argparse.Namespace) -> int:
    text, numbers = tabulate(os.path.abspath(args.out))
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(numbers, handle, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="pre-train and probe every (variant, seed)")
    r.add_argument("--pool", required=True, help="manifest folder of the unlabelled pool (train.tsv)")
    r.add_argument("--set", action="append", default=[], metavar="NAME=DIR", help="a labelled probe set")
    r.add_argument("--recipe", default=os.path.join(ROOT, "examples", "pretraining", "eat_small.yaml"))
    r.add_argument("--out", required=True)
    r.add_argument("--variants", default="base", help=f"comma-separated, from {','.join(VARIANTS)}")
    r.add_argument("--seeds", default="1")
    r.add_argument("--max-update", type=int, default=None, help="updates per run (default: the recipe's)")
    r.add_argument("--minutes-per-run", type=float, default=None,
                   help="equal wall time for the variants that change the cost of an update")
    r.add_argument("--equal-time", action="store_true",
                   help="equal wall time without guessing the machine's speed: a variant that changes the cost "
                        "of an update runs --max-update x (the base's seconds per update / its own), both timed "
                        "back to back in its job")
    r.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="warm-up updates as a fraction of each run's max_update (the recipe's 10%%; 0: the recipe's)")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for every run (before the variant's own)")
    r.add_argument("--threads", type=int, default=1, help="threads per job")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time")
    r.add_argument("--max-per-split", type=int, default=None, help="probe at most N clips per split (quick checks)")
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("table", help="tabulate finished runs")
    t.add_argument("out")
    t.add_argument("--markdown", default=None, metavar="FILE")
    t.add_argument("--json", default=None, metavar="FILE")
    t.set_defaults(func=cmd_table)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
