"""Does pre-training help fine-tuning? Fine-tune from a pre-trained checkpoint and from scratch at equal
budget, on a labelled set with one split per group (FSDD speakers), groups held out.

    # once: FSDD with one split per speaker (george, jackson, lucas, nicolas, theo, yweweler; 500 clips each)
    python manifests/fsdd.py free-spoken-digit-dataset/recordings --dest /data/fsdd_speakers --split-by speaker

    python experiments/finetune_compare.py --checkpoint runs/learning/pretrain/checkpoint_last.pt \\
        --speakers-dir /data/fsdd_speakers --out runs/finetune_compare [--folds 3] [--max-update 1500] \\
        [--seeds 1,2] [--threads 1] [--jobs 2] [--set optimization.lr=[0.0005] --set model.layer_decay=0.75]

Fold k (k = 0 .. K-1, speakers in sorted order): test = speaker k, valid = speaker k+1 (cyclic; used only to
pick checkpoint_best.pt), train = the other speakers. Each fold gets a data folder in OUT/data/fold{k}
(symlinks to the valid/test manifests and labels, a concatenated train manifest; no audio is copied).

Per fold and seed, two runs of ``fairseq-hydra-train`` with the recipe (default
examples/fsdd/finetune_small.yaml) and IDENTICAL overrides, apart from ``model.model_path``:
``pretrained`` (the checkpoint's student encoder) and ``scratch`` (``model.model_path=null``, random init).
Both get the checkpoint's encoder shape (embed_dim, depth, heads, ...) and its pre-training features
(sample rate, target_length, norm_mean/norm_std), the same ``--max-update`` (warm-up 10% unless ``--set``
gives one) and every ``--set`` override. Then eat-evaluate's ``evaluate`` (in this process) scores
checkpoint_best.pt on the test speaker.

Prints per fold the test accuracy of both arms (mean over seeds) and the difference, then the mean +- std
over folds (sample std, ddof 1) and the mean +- std of the per-fold differences, and the valid accuracy of
both arms at 1/8, 1/4, 1/2 and all of the budget (how much sooner a pre-trained start learns); writes
OUT/results.json.
Finished runs are reused when their command line is unchanged (OUT/fold{k}/seed{s}/{arm}/result.json), so
an interrupted comparison resumes; ``--fresh`` reruns everything. Each run's checkpoints, TensorBoard logs
(``eat-plot OUT/fold0/seed1/scratch/checkpoints``) and per-class AP sit in its folder; the ``.pt`` files are
deleted after evaluation unless ``--keep-checkpoints``.

``--jobs N`` runs up to N fine-tunings at once (each with ``--threads`` threads; on a machine with C cores,
jobs x threads <= C). Every run has its own seed, data and folder, so the results do not depend on ``--jobs``;
the evaluations, in this process, take turns.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning import ROOT, _run, _tool, _user_dir  # noqa: E402  (shared subprocess helpers)

ARMS = ("pretrained", "scratch")
DEFAULT_RECIPE = os.path.join(ROOT, "examples", "fsdd", "finetune_small.yaml")
# the encoder's shape: taken from the checkpoint for both arms (regularisation stays the recipe's)
REGULARISATION_FIELDS = ("drop_path_rate", "dropout", "attn_dropout")
FEATURE_FIELDS = ("sample_rate", "target_length", "norm_mean", "norm_std")
# set by this script for every run; --set may not change them (the comparison would no longer be fair
# or the run would land elsewhere)
CONTROLLED_KEYS = ("task.data", "model.model_path", "checkpoint.save_dir", "common.seed", "common.user_dir",
                   "optimization.max_update", "dataset.train_subset", "dataset.valid_subset", "task.num_threads")


class CompareError(Exception):
    """A bad argument or input; the message says which."""


def pretrained_settings(checkpoint: str) -> dict[str, dict[str, Any]]:
    """``{"arch": {...}, "features": {...}}`` of a pre-training checkpoint of ours: the encoder's shape
    (from its tensors and cfg, as ``eat_fairseq.inference.api.load_model`` reads it) and its task's feature settings."""
    from eat_fairseq.inference.api import load_model
    from eat_fairseq.checkpoints.load import CheckpointError, load_checkpoint
    from eat_fairseq.checkpoints.convert import ConversionError, detect_source

    try:
        fmt, kind = detect_source(load_checkpoint(checkpoint))
        if (fmt, kind) != ("eat", "pretrained"):
            raise CompareError(f"{checkpoint}: a {fmt} {kind} checkpoint; fine-tuning starts from a pre-training "
                               "checkpoint of ours (convert a released file with eat-convert first)")
        handle = load_model(checkpoint)
    except (CheckpointError, ConversionError, OSError) as exc:
        raise CompareError(str(exc)) from None
    enc, feat = handle.encoder.cfg, handle.feature_cfg
    arch = {f.name: getattr(enc, f.name) for f in dataclasses.fields(enc) if f.name not in REGULARISATION_FIELDS}
    features = {name: getattr(feat, name) for name in FEATURE_FIELDS}
    return {"arch": arch, "features": features}


def fold_plan(speakers: Sequence[str], folds: int) -> list[dict[str, Any]]:
    """Fold k: test = speakers[k], valid = speakers[k+1] (cyclic), train = the rest, in sorted order."""
    names = sorted(speakers)
    if len(names) < 3:
        raise CompareError(f"need at least 3 speaker splits (train, valid, test), found {names}")
    if not 1 <= folds <= len(names):
        raise CompareError(f"--folds must be between 1 and {len(names)} (one per speaker), got {folds}")
    plan = []
    for k in range(folds):
        test, valid = names[k], names[(k + 1) % len(names)]
        plan.append({"fold": k, "test": test, "valid": valid, "train": [s for s in names if s not in (test, valid)]})
    return plan


def speaker_splits(speakers_dir: str) -> list[str]:
    """Labelled splits (``{name}.tsv`` + ``{name}.lbl``) of the folder; ``label_descriptors.csv`` is required."""
    from eat_fairseq.evaluation.probe import available_splits

    if not os.path.isdir(speakers_dir):
        raise CompareError(f"--speakers-dir {speakers_dir}: not a folder")
    if not os.path.isfile(os.path.join(speakers_dir, "label_descriptors.csv")):
        raise CompareError(f"--speakers-dir {speakers_dir}: no label_descriptors.csv")
    return available_splits(speakers_dir)


def write_fold_data(speakers_dir: str, fold: dict[str, Any], dest: str) -> str:
    """The fold's data folder: train.tsv/.lbl concatenated from the train speakers (addresses, span and
    shard rows included, rewritten against their common root), valid/test and label_descriptors.csv as symlinks. Rebuilt every time
    (it is derived from ``speakers_dir``)."""
    from eat_fairseq.data.manifest import read_manifest
    from eat_fairseq.prep.common import read_lines, write_manifest, write_text_atomic

    src = os.path.abspath(speakers_dir)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    rows: list[tuple[str, int]] = []
    labels: list[str] = []
    for name in fold["train"]:
        root, manifest_rows = read_manifest(os.path.join(src, f"{name}.tsv"))
        # the address as written (a span's or shard's range kept), re-rooted below
        rows += [(os.path.abspath(os.path.join(root, r.rel)), r.num_samples) for r in manifest_rows]
        labels += [line for line in read_lines(os.path.join(src, f"{name}.lbl")) if line.strip()]
    root = os.path.commonpath([os.path.dirname(p) for p, _ in rows])
    write_manifest(Path(dest, "train.tsv"), root, ((os.path.relpath(p, root), n) for p, n in rows))
    write_text_atomic(Path(dest, "train.lbl"), "".join(f"{line}\n" for line in labels))
    for split in ("valid", "test"):
        for ext in ("tsv", "lbl"):
            os.symlink(os.path.join(src, f"{fold[split]}.{ext}"), os.path.join(dest, f"{split}.{ext}"))
    os.symlink(os.path.join(src, "label_descriptors.csv"), os.path.join(dest, "label_descriptors.csv"))
    return dest


def _hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def shared_overrides(settings: dict[str, dict[str, Any]], max_update: int, user_set: Sequence[str]) -> list[str]:
    """Overrides both arms get: the checkpoint's encoder shape and features, the budget, then ``--set``."""
    for item in user_set:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item or key in CONTROLLED_KEYS or key in {f"model.{k}" for k in settings["arch"]} \
                or key in {f"task.{k}" for k in settings["features"]}:
            raise CompareError(f"--set {item!r}: expected KEY=VALUE for a key this script does not set itself "
                               "(the data, checkpoint, seed, budget, encoder shape and features are fixed per run)")
    # "++": set the key whether or not the recipe names it
    out = [f"++model.{k}={_hydra_value(v)}" for k, v in settings["arch"].items()]
    out += [f"++task.{k}={_hydra_value(v)}" for k, v in settings["features"].items()]
    out.append(f"optimization.max_update={max_update}")
    if not any(item.split("=", 1)[0].lstrip("+~") == "lr_scheduler.warmup_updates" for item in user_set):
        out.append(f"++lr_scheduler.warmup_updates={max(1, max_update // 10)}")
    return out + list(user_set)


_EVALUATE_LOCK = threading.Lock()  # --jobs: one evaluation at a time in this process


def run_arm(arm: str, args: argparse.Namespace, data_dir: str, run_dir: str, shared: list[str], seed: int,
            env: dict[str, str]) -> dict[str, Any]:
    """Fine-tune one arm and evaluate its checkpoint_best.pt on the test split (reuses a finished run
    with the same command)."""
    recipe = os.path.abspath(args.recipe)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    model_path = os.path.abspath(args.checkpoint) if arm == "pretrained" else "null"
    cmd = [
        _tool("fairseq-hydra-train"), "--config-dir", os.path.dirname(recipe),
        "--config-name", os.path.splitext(os.path.basename(recipe))[0],
        f"task.data={data_dir}", f"common.user_dir={_user_dir()}", f"checkpoint.save_dir={ckpt_dir}",
        f"common.seed={seed}", f"task.num_threads={env['OMP_NUM_THREADS']}", *shared, f"model.model_path={model_path}",
    ]
    result_path = os.path.join(run_dir, "result.json")
    if not args.fresh and os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if cached.get("command") == cmd[1:]:
            print(f"  {arm}: reusing {result_path}", flush=True)
            log = os.path.join(run_dir, "train.log")
            if "valid_curve" not in cached and os.path.isfile(log):  # a result.json of an older version
                cached["valid_curve"] = valid_curve(log)
            return cached
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)  # a leftover checkpoint_last.pt would be resumed
    os.makedirs(run_dir)
    print(f"  {arm} seed {seed}: fine-tuning ({run_dir}/train.log)", flush=True)
    train_seconds = _run(cmd, os.path.join(run_dir, "train.log"), env)
    # eat-evaluate's library function, in this process (saves a fairseq start per run)
    from eat_fairseq.cli.evaluate import evaluate

    best = os.path.join(ckpt_dir, "checkpoint_best.pt")
    with _EVALUATE_LOCK:
        eval_start = time.perf_counter()
        try:
            metrics = evaluate(best, data_dir, split="test", device="cpu",
                               out=os.path.join(run_dir, "per_class_ap_test.tsv"), progress=False)
        except Exception as exc:  # name the run; the training log is next to it
            raise RuntimeError(f"evaluating {best} on {data_dir}/test.tsv failed: {exc}") from exc
        eval_seconds = time.perf_counter() - eval_start
    curve = valid_curve(os.path.join(run_dir, "train.log"))
    result = {
        "arm": arm, "seed": seed, "test_accuracy": metrics["accuracy"], "test_mAP": metrics["mAP"],
        "test_clips": metrics["clips"], "best_valid_accuracy": _best(curve),
        "valid_curve": curve,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1), "command": cmd[1:],
    }
    if not args.keep_checkpoints:  # the TensorBoard logs in it stay
        for name in os.listdir(ckpt_dir):
            if name.endswith(".pt"):
                os.remove(os.path.join(ckpt_dir, name))
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(f"  {arm} seed {seed}: test accuracy {result['test_accuracy']:.4f} ({run_dir}, train {train_seconds:.0f} s)",
          flush=True)
    return result


def valid_curve(train_log: str) -> list[list[float]]:
    """``[[num_updates, valid accuracy], ...]`` at every validation fairseq logged, in order."""
    curve = []
    with open(train_log, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if "valid on" in line and "| accuracy " in line and "| num_updates " in line:
                acc = float(line.split("| accuracy ", 1)[1].split("|")[0].strip())
                curve.append([int(line.split("| num_updates ", 1)[1].split("|")[0].strip()), acc])
    return curve


def _best(curve: Sequence[Sequence[float]]) -> Optional[float]:
    """The highest valid accuracy of a curve (the one checkpoint_best.pt was saved at); None if empty."""
    return max((acc for _, acc in curve), default=None)


def best_valid_accuracy(train_log: str) -> Optional[float]:
    """The highest valid accuracy fairseq logged in ``train_log``; None if none."""
    return _best(valid_curve(train_log))


def _at(curve: Sequence[Sequence[float]], update: int) -> Optional[tuple[int, float]]:
    """``(num_updates, valid accuracy)`` of the last validation at or before ``update`` (None before the first)."""
    values = [(int(n), acc) for n, acc in curve if n <= update]
    return values[-1] if values else None


def curve_summary(folds: list[dict[str, Any]], max_update: int, fractions: Sequence[float] = (0.125, 0.25, 0.5, 1.0)
                  ) -> list[dict[str, Any]]:
    """Valid accuracy (the valid speaker, never trained on) of both arms part-way through fine-tuning:
    how much sooner a pre-trained start gets somewhere, which the final test accuracy does not show.
    Per point: the mean over folds of each arm (mean over seeds), the mean difference and in how many
    folds the pre-trained arm was ahead, at the last validation up to that point ("update" says which).
    Points where a run has not validated yet are left out."""
    points = []
    for frac in fractions:
        update = max(1, round(frac * max_update))
        per_fold, validated_at = [], 0
        for fold in folds:
            arms = {}
            for arm in ARMS:
                vals = [_at(r.get("valid_curve") or [], update) for r in fold["runs"] if r["arm"] == arm]
                if not vals or any(v is None for v in vals):
                    break
                arms[arm] = statistics.fmean(acc for _, acc in vals)
                validated_at = max(validated_at, *(n for n, _ in vals))
            else:
                per_fold.append(arms)
        if len(per_fold) != len(folds) or (points and points[-1]["update"] == validated_at):
            continue  # not validated yet, or the same validation as the previous point
        diffs = [f["pretrained"] - f["scratch"] for f in per_fold]
        points.append({"update": validated_at, "pretrained": statistics.fmean(f["pretrained"] for f in per_fold),
                       "scratch": statistics.fmean(f["scratch"] for f in per_fold),
                       "difference": statistics.fmean(diffs), "difference_std": _mean_std(diffs)[1],
                       "folds_pretrained_ahead": sum(d > 0 for d in diffs)})
    return points


def format_curve(points: list[dict[str, Any]], num_folds: int) -> str:
    lines = ["valid accuracy (%) of the valid speakers while fine-tuning, mean over folds",
             f"{'update':>8} {'pretrained':>11} {'scratch':>9} {'difference':>16} {'ahead':>8}"]
    for p in points:
        lines.append(f"{p['update']:>8} {100 * p['pretrained']:>11.1f} {100 * p['scratch']:>9.1f} "
                     f"{100 * p['difference']:>+9.1f} +- {100 * p['difference_std']:>4.1f} "
                     f"{p['folds_pretrained_ahead']:>3} of {num_folds}")
    return "\n".join(lines)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fold: each arm's test accuracy averaged over seeds and the difference; over folds: mean +- std."""
    for fold in folds:
        for arm in ARMS:
            fold[arm] = statistics.fmean(r["test_accuracy"] for r in fold["runs"] if r["arm"] == arm)
        fold["difference"] = fold["pretrained"] - fold["scratch"]
    summary: dict[str, Any] = {}
    for key in (*ARMS, "difference"):
        mean, std = _mean_std([f[key] for f in folds])
        summary[key] = {"mean": mean, "std": std}
    # the standard error of the mean difference: how far the mean could move with other speakers
    summary["difference"]["sem"] = summary["difference"]["std"] / len(folds) ** 0.5
    summary["folds_pretrained_better"] = sum(f["difference"] > 0 for f in folds)
    pairs = [(r["test_accuracy"], s["test_accuracy"]) for f in folds for r in f["runs"] for s in f["runs"]
             if r["arm"] == "pretrained" and s["arm"] == "scratch" and r["seed"] == s["seed"]]
    summary["runs_pretrained_better"] = sum(p > s for p, s in pairs)
    summary["runs_compared"] = len(pairs)
    return summary


def format_table(folds: list[dict[str, Any]], summary: dict[str, Any], seeds: Sequence[int]) -> str:
    lines = [f"test accuracy (%), speakers held out; mean over seeds {','.join(map(str, seeds))}",
             f"{'fold':<4} {'test':<10} {'valid':<10} {'pretrained':>14} {'scratch':>14} {'difference':>14}"]
    for f in folds:
        lines.append(f"{f['fold']:<4} {f['test']:<10} {f['valid']:<10} {100 * f['pretrained']:>14.1f} "
                     f"{100 * f['scratch']:>14.1f} {100 * f['difference']:>+14.1f}")
    s = summary
    cells = [f"{100 * s[k]['mean']:{'+' if k == 'difference' else ''}.1f} +- {100 * s[k]['std']:.1f}"
             for k in (*ARMS, "difference")]
    lines.append(f"{'mean +- std, ' + str(len(folds)) + ' folds':<26} " + " ".join(f"{c:>14}" for c in cells))
    lines.append(f"pretrained better on {s['folds_pretrained_better']} of {len(folds)} folds "
                 f"({s['runs_pretrained_better']} of {s['runs_compared']} fold-seed pairs); mean difference "
                 f"{100 * s['difference']['mean']:+.1f}, standard error {100 * s['difference']['sem']:.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint of ours (eat model)")
    p.add_argument("--speakers-dir", required=True,
                   help="labelled folder with one split per speaker ({name}.tsv/.lbl) and label_descriptors.csv")
    p.add_argument("--out", required=True, help="work folder (fold data, runs, results.json)")
    p.add_argument("--folds", type=int, default=3, help="held-out test speakers, rotating in sorted order (default 3)")
    p.add_argument("--max-update", type=int, default=1500, help="fine-tuning updates per run, both arms (default 1500)")
    p.add_argument("--seeds", default="1", help="comma-separated fine-tuning seeds (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every run (OMP_NUM_THREADS, task.num_threads; default: $OMP_NUM_THREADS, "
                        "else 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="fine-tuning runs at once (default 1); keep jobs x threads <= the machine's cores")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="fine-tuning yaml (default examples/fsdd/finetune_small.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="hydra override for BOTH arms, e.g. model.layer_decay=0.75 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing their results")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; returns what results.json holds."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise CompareError("--seeds: no seed given")
    if args.jobs < 1:
        raise CompareError(f"--jobs must be >= 1, got {args.jobs}")
    if args.max_update < 1:
        raise CompareError(f"--max-update must be >= 1, got {args.max_update}")
    if not os.path.isfile(args.recipe):
        raise CompareError(f"--recipe {args.recipe}: not found")
    plan = fold_plan(speaker_splits(args.speakers_dir), args.folds)
    settings = pretrained_settings(args.checkpoint)
    shared = shared_overrides(settings, args.max_update, args.set)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS") or 1)
    env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # the evaluations run in this process
    print(f"encoder {settings['arch']}\nfeatures {settings['features']}\nshared overrides: {' '.join(shared)}", flush=True)

    start = time.perf_counter()
    tasks = []  # (fold index, seed, arm, data dir, run dir), in the order a serial run takes them
    for fold in plan:
        print(f"fold {fold['fold']}: test {fold['test']}, valid {fold['valid']}, train {','.join(fold['train'])}",
              flush=True)
        data_dir = write_fold_data(args.speakers_dir, fold, os.path.join(out, "data", f"fold{fold['fold']}"))
        for seed in seeds:
            for arm in ARMS:
                tasks.append((fold["fold"], seed, arm, data_dir,
                              os.path.join(out, f"fold{fold['fold']}", f"seed{seed}", arm)))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_arm, arm, args, data_dir, run_dir, shared, seed, env)
                   for _, seed, arm, data_dir, run_dir in tasks]
        results = [f.result() for f in futures]  # the first failure (in task order) is raised
    folds = [{**fold, "runs": [r for t, r in zip(tasks, results) if t[0] == fold["fold"]]} for fold in plan]
    summary = summarize(folds)
    table = format_table(folds, summary, seeds)
    curve = curve_summary(folds, args.max_update)
    if curve:
        table += "\n\n" + format_curve(curve, len(folds))
    print("\n" + table)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "checkpoint": os.path.abspath(args.checkpoint),
        "recipe": os.path.relpath(os.path.abspath(args.recipe), ROOT),
        "speakers_dir": os.path.abspath(args.speakers_dir),
        "max_update": args.max_update,
        "seeds": seeds,
        "threads": env["OMP_NUM_THREADS"],
        "jobs": args.jobs,
        "overrides": args.set,
        "shared_overrides": shared,
        "pretrained": settings,
        "folds": folds,
        "summary": summary,
        "valid_curve": curve,
        "table": table,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(f"results in {out}/results.json ({result['wall_seconds'] / 60:.1f} min)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CompareError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CompareError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
