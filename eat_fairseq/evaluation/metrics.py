"""Evaluation metrics for fine-tuning (docs/reference.md section 4), in numpy, without scikit-learn.

``average_precision`` and ``roc_auc`` reproduce scikit-learn's ``average_precision_score`` and
``roc_auc_score`` per class (ties included), so our mAP numbers are comparable with published ones.
Classes without positives have no AP (and no AUC), so they are skipped by the means and reported as
NaN per class; AUC also needs at least one negative.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _as_2d(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, scores = y_true[:, None], scores[:, None]
    if y_true.shape != scores.shape:
        raise ValueError(f"targets {y_true.shape} and scores {scores.shape} differ in shape")
    return (y_true > 0.5).astype(np.float64), scores


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP per class for binary targets (N, C) and scores (N, C); NaN where a class has no positive.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds, highest first (tied scores form
    one threshold), which is scikit-learn's step-wise definition (no interpolation).
    """
    y_true, scores = _as_2d(y_true, scores)
    result = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        positives = y_true[:, c].sum()
        if positives == 0:
            continue
        order = np.argsort(-scores[:, c], kind="mergesort")
        sorted_scores = scores[order, c]
        tps = np.cumsum(y_true[order, c])
        last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
        tps = tps[last_of_tie]
        seen = np.arange(1, len(order) + 1)[last_of_tie]
        precision = tps / seen
        recall_step = np.diff(np.r_[0.0, tps]) / positives
        result[c] = float(np.sum(recall_step * precision))
    return result


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, np.diff(sorted_values) != 0]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(values))
    ranks[order] = mean_rank[group]
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC per class; NaN where a class has no positive or no negative.

    Uses the Mann-Whitney form (average ranks for ties), which equals the area under the trapezoidal
    ROC curve that scikit-learn integrates.
    """
    y_true, scores = _as_2d(y_true, scores)
    result = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        pos = y_true[:, c].sum()
        neg = len(y_true) - pos
        if pos == 0 or neg == 0:
            continue
        ranks = _average_ranks(scores[:, c])
        result[c] = float((ranks[y_true[:, c] == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
    return result


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """mAP over classes that have at least one positive (NaN if none has)."""
    ap = average_precision(y_true, scores)
    return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


def mean_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over classes with both positives and negatives (NaN if none)."""
    auc = roc_auc(y_true, scores)
    return float(np.nanmean(auc)) if np.any(~np.isnan(auc)) else float("nan")


def accuracy(targets: np.ndarray, scores: np.ndarray) -> float:
    """Top-1 accuracy; ``targets`` are class indices (N,) or (multi-/one-)hot rows (N, C).

    For multi-hot rows a prediction counts as correct when the top class is one of the positives.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    predicted = scores.argmax(axis=1)
    if targets.ndim == 1:
        return float(np.mean(predicted == targets)) if len(targets) else float("nan")
    hits = targets[np.arange(len(targets)), predicted] > 0.5
    return float(np.mean(hits)) if len(targets) else float("nan")


@dataclass
class ClassificationReport:
    """Summary metrics plus per-class AP/AUC (NaN where undefined) as plain Python floats."""

    mAP: float
    accuracy: float
    auc: float
    per_class_ap: np.ndarray
    per_class_auc: np.ndarray
    positives: np.ndarray


def evaluate_predictions(targets: np.ndarray, scores: np.ndarray, num_classes: int | None = None) -> ClassificationReport:
    """All metrics at once. ``targets``: indices (N,) or multi-hot (N, C); ``scores``: (N, C)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    num_classes = num_classes or scores.shape[1]
    if targets.ndim == 1:
        hot = np.zeros((len(targets), num_classes))
        hot[np.arange(len(targets)), targets.astype(np.int64)] = 1.0
    else:
        hot = (targets > 0.5).astype(np.float64)
    ap = average_precision(hot, scores)
    auc = roc_auc(hot, scores)
    return ClassificationReport(
        mAP=float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan"),
        accuracy=accuracy(targets, scores),
        auc=float(np.nanmean(auc)) if np.any(~np.isnan(auc)) else float("nan"),
        per_class_ap=ap,
        per_class_auc=auc,
        positives=hot.sum(axis=0),
    )


def write_per_class_ap(
    path: str | os.PathLike,
    report: ClassificationReport,
    labels: Sequence[str],
    display_names: Sequence[str] | None = None,
) -> None:
    """TSV ``index label display_name positives ap auc`` (``nan`` where undefined), sorted by index."""
    display_names = display_names if display_names is not None else labels
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "label", "display_name", "positives", "ap", "auc"])
        for i, label in enumerate(labels):
            writer.writerow(
                [
                    i,
                    label,
                    display_names[i],
                    int(report.positives[i]),
                    f"{report.per_class_ap[i]:.6f}",
                    f"{report.per_class_auc[i]:.6f}",
                ]
            )
