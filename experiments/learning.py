"""Does pre-training help? Pool -> pre-train a recipe for a budget -> frozen-feature probe.

    # once: ~4.9 h of real unlabelled audio (as root), and FSDD with one split per speaker
    python3 experiments/build_pretrain_pool.py --out /data/pool
    python manifests/audio_folder.py /data/pool/audio --dest /data/pool_manifests --valid-percent 0
    python manifests/windows.py /data/pool_manifests --dest /data/pool_w128 --frames 128 --min-last 0.5
    python manifests/fsdd.py free-spoken-digit-dataset/recordings --dest /data/fsdd_speakers --split-by speaker

    python experiments/learning.py --pool /data/pool_w128 --probe-data /data/fsdd_speakers \\
        --recipe examples/pretraining/eat_small.yaml --out runs/learning --threads 2 --probe-every 600

Pre-trains the recipe with ``fairseq-hydra-train`` (online probe on the same labelled set), then runs
``eat-probe`` on the final checkpoint: student and teacher, every layer, against the same
architecture at random initialisation and the log-mel baseline, leave-one-split-out (one split per
speaker: speakers are held out). Prints the probe table, the best row of each model, and the best
block of each model per pooling (a readout can lift random weights as much as trained ones: compare
within a row), and writes ``results.json`` into ``--out``. ``--set key=value`` overrides recipe settings (hydra
syntax, for ablations; repeat it per setting). Fine-tuning from the checkpoint against fine-tuning
from scratch at equal budget is ``experiments/finetune_compare.py``; several pre-training seeds (``--seed``,
one ``--out`` each) are combined speaker by speaker by ``experiments/learning_seeds.py``. An interrupted run
(a kill, a closed session) continues from its last checkpoint with the same arguments plus ``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str) -> str:
    """A console script of the running interpreter's environment (falls back to PATH)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else (shutil.which(name) or name)


def _run(cmd: list[str], log_path: str, env: dict[str, str], append: bool = False) -> float:
    """Run ``cmd`` with its output in ``log_path`` (added to its end with ``append``); returns the wall
    time, raises on failure."""
    start = time.perf_counter()
    with open(log_path, "a" if append else "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(log_path))
    elapsed = time.perf_counter() - start
    if proc.returncode:
        with open(log_path, encoding="utf-8") as log:
            tail = "".join(log.readlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}); last lines of {log_path}:\n{tail}")
    return elapsed


def pretrain(args: argparse.Namespace, out: str, env: dict[str, str]) -> tuple[str, float]:
    """Pre-train the recipe; returns (checkpoint path, wall seconds of this process).

    A new run replaces ``OUT/pretrain`` (fairseq would resume a leftover ``checkpoint_last.pt``);
    ``args.resume`` keeps it, so fairseq continues an interrupted run exactly where its last checkpoint
    left it, and its output goes after the earlier run's in ``pretrain.log``.
    """
    recipe = os.path.abspath(args.recipe)
    ckpt_dir = os.path.join(out, "pretrain")
    last = os.path.join(ckpt_dir, "checkpoint_last.pt")
    if args.resume:
        if not os.path.exists(last):
            raise SystemExit(f"--resume: no {last} to resume from")
    elif os.path.exists(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    cmd = [
        _tool("fairseq-hydra-train"), "--config-dir", os.path.dirname(recipe),
        "--config-name", os.path.splitext(os.path.basename(recipe))[0],
        f"task.data={os.path.abspath(args.pool)}", f"common.user_dir={_user_dir()}",
        f"checkpoint.save_dir={ckpt_dir}", f"common.seed={args.seed}",
        f"common.tensorboard_logdir={os.path.join(ckpt_dir, 'tensorboard')}",
    ]
    if args.probe_every:
        cmd += [f"task.probe_data={os.path.abspath(args.probe_data)}",
                f"task.probe_interval_updates={args.probe_every}",
                f"task.probe_max_per_split={args.probe_max_per_split}"]
    if args.max_update:
        cmd.append(f"optimization.max_update={args.max_update}")
    if args.budget_minutes:
        cmd.append(f"optimization.stop_time_hours={args.budget_minutes / 60.0}")
    cmd += args.set
    print("pre-training:", " ".join(cmd), flush=True)
    seconds = _run(cmd, os.path.join(out, "pretrain.log"), env, append=args.resume)
    return last, seconds


def _user_dir() -> str:
    import eat_fairseq

    return eat_fairseq.USER_DIR


def probe(args: argparse.Namespace, ckpt: str, out: str, env: dict[str, str]) -> dict[str, Any]:
    """eat-probe on the checkpoint (student, teacher, random init, log-mel)."""
    result_path = os.path.join(out, "probe.json")
    cmd = [_tool("eat-probe"), ckpt, "--data", os.path.abspath(args.probe_data), "--folds", "auto",
           "--teacher", "--layers", "all", "--pooling", args.pooling, "--json", result_path]
    if not args.no_baselines:
        cmd += ["--random-init", "--seed", str(args.seed)]
    else:
        cmd.append("--no-logmel")
    print("probing:", " ".join(cmd), flush=True)
    seconds = _run(cmd, os.path.join(out, "probe.log"), env)
    with open(result_path, encoding="utf-8") as handle:
        result = json.load(handle)
    result["probe_seconds"] = seconds
    return result


def _kind(model: str) -> str:
    return ("logmel" if model == "logmel" else "random-init" if model.startswith("random-init")
            else "teacher" if model.endswith(":teacher") else "student")


def summarize(rows: list[dict[str, Any]], pooling: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Best logistic-regression row per model kind (student / teacher / random-init / logmel), over
    every layer and pooling, or over the layers of one encoder ``pooling`` (log-mel: always its best row)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        kind = _kind(row["model"])
        if pooling is not None and kind != "logmel" and row["pooling"] != pooling:
            continue
        if row.get("logreg") is not None and (kind not in best or row["logreg"] > best[kind]["logreg"]):
            best[kind] = row
    return best


def summarize_by_pooling(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{pooling: best row per kind}`` for every encoder pooling probed: a readout that helps random
    weights as much as trained ones (freqstd does) shows up here, where the overall best row hides it."""
    poolings = sorted({r["pooling"] for r in rows if _kind(r["model"]) != "logmel"})
    return {p: summarize(rows, p) for p in poolings}


def print_summary(best: dict[str, dict[str, Any]], by_pooling: Optional[dict[str, dict[str, dict[str, Any]]]] = None) -> None:
    print("\nbest row per model (logistic regression, mean over held-out speakers):")
    for kind in ("student", "teacher", "random-init", "logmel"):
        if kind in best:
            r = best[kind]
            layer = "-" if r["layer"] is None else r["layer"]
            print(f"  {kind:<12} {100 * r['logreg']:5.1f} +- {100 * r['logreg_std']:4.1f}  "
                  f"(layer {layer}, {r['pooling']}; knn {100 * r['knn']:.1f})")
    if "random-init" in best and "logmel" in best:
        for kind in ("student", "teacher"):
            if kind in best:
                print(f"  {kind} - random-init: {100 * (best[kind]['logreg'] - best['random-init']['logreg']):+.1f} "
                      f"points; {kind} - log-mel: {100 * (best[kind]['logreg'] - best['logmel']['logreg']):+.1f} points")
    if not by_pooling:
        return
    print("\nper readout (best block of each model with that pooling; log-mel: its best row):")
    print(f"  {'pooling':<8} {'student':>8} {'teacher':>8} {'random':>8} {'log-mel':>8} "
          f"{'stu-rnd':>8} {'stu-mel':>8} {'tea-rnd':>8} {'tea-mel':>8}")
    for pooling, b in by_pooling.items():
        acc = {k: (100 * b[k]["logreg"] if k in b else None) for k in ("student", "teacher", "random-init", "logmel")}
        cells = [f"{v:8.1f}" if v is not None else f"{'-':>8}" for v in acc.values()]
        for kind in ("student", "teacher"):
            for ref in ("random-init", "logmel"):
                ok = acc[kind] is not None and acc[ref] is not None
                cells.append(f"{acc[kind] - acc[ref]:+8.1f}" if ok else f"{'-':>8}")
        print(f"  {pooling:<8} " + " ".join(cells))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True, help="manifest folder of the unlabelled pool (train.tsv)")
    p.add_argument("--probe-data", required=True, help="labelled folder, one split per held-out group")
    p.add_argument("--recipe", default=os.path.join(ROOT, "examples", "pretraining", "eat_small.yaml"))
    p.add_argument("--out", required=True, help="run folder (its pretrain/ is replaced unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/pretrain/checkpoint_last.pt (give the same "
                        "arguments again); the recorded pre-training time is then this process's only")
    p.add_argument("--max-update", type=int, default=None, help="override the recipe's max_update")
    p.add_argument("--budget-minutes", type=float, default=None, help="stop pre-training after this wall time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every step (default: inherited)")
    p.add_argument("--probe-every", type=int, default=0, help="online probe interval in updates (0: none)")
    p.add_argument("--probe-max-per-split", type=int, default=100, help="clips per split for the online probe")
    p.add_argument("--pooling", default="cls,mean,freq,freqstd", help="poolings of the final probe")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-init and log-mel rows")
    p.add_argument("--skip-pretrain", action="store_true", help="probe an existing OUT/pretrain/checkpoint_last.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hydra override for the recipe")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    if args.skip_pretrain:
        ckpt, seconds = os.path.join(out, "pretrain", "checkpoint_last.pt"), None
    else:
        ckpt, seconds = pretrain(args, out, env)
    result = probe(args, ckpt, out, env)
    best = summarize(result["rows"])
    by_pooling = summarize_by_pooling(result["rows"])
    with open(os.path.join(out, "probe.log"), encoding="utf-8") as handle:
        print(handle.read())
    print_summary(best, by_pooling)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "recipe": os.path.relpath(os.path.abspath(args.recipe), ROOT),
        "overrides": args.set,
        "max_update": args.max_update,
        "budget_minutes": args.budget_minutes,
        "threads": env.get("OMP_NUM_THREADS"),
        "pretrain_seconds": seconds,
        "resumed": bool(args.resume),
        "best": best,
        "best_per_pooling": by_pooling,
        "probe": result,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    if seconds is not None:
        resumed = " (this process: the run was resumed)" if args.resume else ""
        print(f"\npre-training wall time {seconds / 60:.1f} min{resumed}; results in {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
