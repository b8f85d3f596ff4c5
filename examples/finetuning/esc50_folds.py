"""ESC-50 five-fold cross-validation: fine-tune and evaluate once per held-out fold, print the accuracies.

ESC-50 results are the mean accuracy over the 5 official folds (reference section 4). The data root is
what ``manifests/esc50.py`` writes: ``ROOT/fold{k}/{train,eval}.{tsv,lbl}`` and ``label_descriptors.csv``.

    python examples/finetuning/esc50_folds.py --data-root /data/esc50_manifests \
        --pretrained /ckpt/pretrain/checkpoint_last.pt --save-root runs/esc50 [-- extra=overrides ...]

Anything after ``--`` is passed to fairseq-hydra-train as hydra overrides (e.g. ``common.fp16=false``).
Each fold is evaluated on its held-out split with ``eat-evaluate`` using ``--checkpoint-name``
(``checkpoint_last.pt`` by default: choosing the best of several validations on the evaluation fold
itself would select on the test data).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent


def _tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_fold(
    fold: int, data_root: Path, save_root: Path, pretrained: Optional[str], config_name: str,
    checkpoint_name: str, overrides: Sequence[str], batch_size: int, device: Optional[str],
) -> dict:
    import eat_fairseq

    data = data_root / f"fold{fold}"
    save = save_root / f"fold{fold}"
    if not (data / "train.tsv").exists() or not (data / "eval.tsv").exists():
        raise FileNotFoundError(f"{data}: expected train.tsv and eval.tsv (run manifests/esc50.py first)")
    train = [
        _tool("fairseq-hydra-train"), "--config-dir", str(HERE), "--config-name", config_name,
        f"common.user_dir={eat_fairseq.USER_DIR}", f"task.data={data.resolve()}",
        f"checkpoint.save_dir={save.resolve()}", f"task.per_class_ap_dir={save.resolve()}",
    ]
    if pretrained:
        train.append(f"model.model_path={Path(pretrained).resolve()}")
    train.extend(overrides)
    print(f"[fold {fold}] {' '.join(train)}", flush=True)
    subprocess.run(train, check=True)
    evaluate = [
        _tool("eat-evaluate"), "--checkpoint", str(save / checkpoint_name), "--data", str(data),
        "--split", "eval", "--batch-size", str(batch_size), "--out", str(save / "per_class_ap_eval.tsv"),
        "--no-progress",
    ]
    if device:
        evaluate += ["--device", device]
    out = subprocess.run(evaluate, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="", flush=True)
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="ESC-50 5-fold fine-tuning and evaluation.")
    parser.add_argument("--data-root", required=True, type=Path, help="folder with fold1..fold5 (manifests/esc50.py)")
    parser.add_argument("--pretrained", default=None, help="pre-training checkpoint (model.model_path)")
    parser.add_argument("--save-root", default=Path("checkpoints/finetune_esc50"), type=Path,
                        help="one fold{k} folder per fold (default: %(default)s)")
    parser.add_argument("--folds", default="1,2,3,4,5", help="comma-separated folds")
    parser.add_argument("--config-name", default="esc50", help="config in examples/finetuning")
    parser.add_argument("--checkpoint-name", default="checkpoint_last.pt")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    accuracies = {}
    for fold in folds:
        result = run_fold(fold, args.data_root, args.save_root, args.pretrained, args.config_name,
                          args.checkpoint_name, overrides, args.batch_size, args.device)
        accuracies[fold] = float(result["accuracy"])
    for fold, acc in accuracies.items():
        print(f"fold {fold}: accuracy {acc:.4f}")
    mean = sum(accuracies.values()) / len(accuracies)
    print(f"mean accuracy over {len(accuracies)} folds: {mean:.4f}")
    summary = {"folds": accuracies, "mean_accuracy": mean}
    os.makedirs(args.save_root, exist_ok=True)
    (Path(args.save_root) / "esc50_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
