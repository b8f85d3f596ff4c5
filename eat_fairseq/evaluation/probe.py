"""Frozen-feature probes: how good are an encoder's features on a labelled set, without fine-tuning?

A self-supervised loss going down says little about whether the features are useful (EAT's targets
are instance-normalised, so even a collapsed teacher gives a "healthy" loss). The standard check
(solo-learn, DINO) is a probe: freeze the encoder, pool its outputs per clip, and fit a simple
classifier on a labelled set. This module does that for any EAT encoder, per layer and pooling, with
two classifiers, and also for pooled log-mel features as the baseline any learnt feature should beat.

Poolings of one block's output ``(B, 1 + H*W, D)`` (CLS first, time-major patches, W frequency
patches):

- ``cls``: the CLS token ``(B, D)``;
- ``mean``: the mean over patches ``(B, D)``;
- ``freq``: per frequency column, the mean over time ``(B, W*D)``. Mean-pooling all patches throws
  away which frequency band a feature came from; keeping the W columns apart retains it.
- ``freqstd``: per frequency column, the mean and the standard deviation over time ``(B, 2*W*D)``:
  the same statistics as the ``logmel-meanstd`` baseline, so the two rows compare like with like.

By default only time patches that hold real frames are pooled (``pool_padding=False``): a short clip
zero-padded to the model's window would otherwise be described mostly by its padding. Log-mel rows
pool the normalised fbank over its real frames: ``logmel-mean`` (per-bin mean, 128 values) and
``logmel-meanstd`` (per-bin mean and std, 256).

Classifiers (both in PyTorch, deterministic, no global RNG use):

- ``logreg``: features standardised with the training set's statistics, multinomial logistic
  regression fitted to convergence with L-BFGS; the L2 strength is chosen from a small grid on a
  held-out part of the training data (one training fold, or 20% of a fixed training split), then the
  model is refitted on all training data. ``l2_folds="others"`` chooses it on every other training
  fold in turn (mean accuracy; k-1 times the fits): one fold's choice can flip between two strengths
  on features that differ by 1e-6 and move that fold by several points, which the mean over folds
  steadies when two feature sets are compared (int8 against fp32);
- ``knn``: standardised and L2-normalised features, the 20 most cosine-similar training clips vote
  with weights ``exp(sim / 0.07)`` (the DINO / solo-learn kNN).

Evaluation is either leave-one-fold-out over several labelled splits (e.g. one split per speaker, so
speakers are held out) or one fixed train/test pair. Results are mean and std over folds.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eat_fairseq.data.audio import AudioError, to_mono_16k
from eat_fairseq.data.clips import open_clip, read_row
from eat_fairseq.data.features import DEFAULT_TARGET_LENGTH, FeatureConfig, fbank_of, normalize, pad_or_crop, to_window
from eat_fairseq.data.labels import read_label_descriptors, read_split_labels
from eat_fairseq.data.manifest import ManifestRow, read_manifest_rows
from eat_fairseq.model.encoder import EATEncoder

__all__ = [
    "POOLINGS",
    "LOGMEL_POOLINGS",
    "OnlineProbe",
    "ProbeData",
    "ProbeDataError",
    "ProbeResult",
    "SplitSpec",
    "parse_splits",
    "load_probe_data",
    "encoder_features",
    "logmel_features",
    "cropped_clips",
    "fit_logistic",
    "logreg_accuracy",
    "knn_accuracy",
    "evaluate_features",
    "probe_encoder",
    "format_table",
    "chance_level",
    "probe_logmel",
    "available_splits",
    "check_fold_classes",
    "isolated_rng",
]

POOLINGS = ("cls", "mean", "freq", "freqstd")
LOGMEL_POOLINGS = ("logmel-mean", "logmel-meanstd")
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
KNN_K = 20
KNN_TEMPERATURE = 0.07


# --------------------------------------------------------------------------------------------------
# data


class ProbeDataError(ValueError):
    """A labelled probe set that cannot be used, in one line naming the file (and line) at fault.

    Raised while a training run sets up, so a bad label line or clip stops it before the first update
    instead of at the first probe, possibly hours later and again at every restart.
    """

    @classmethod
    def wrap(cls, data_dir: str, exc: BaseException) -> "ProbeDataError":
        """The error for ``exc`` (whose message names the file and line) in one line, ``exc`` its cause."""
        error = cls(f"probe data {data_dir}: {' '.join(str(exc).split()) or type(exc).__name__}")
        error.__cause__ = exc
        return error


@dataclass
class SplitSpec:
    """Which labelled splits to use: ``folds`` (leave-one-out over them) or ``train`` / ``test``."""

    folds: list[str] = field(default_factory=list)
    train: Optional[str] = None
    test: Optional[str] = None

    def names(self) -> list[str]:
        return list(self.folds) if self.folds else [self.train or "", self.test or ""]


def available_splits(data_dir: str) -> list[str]:
    """Names of the splits in ``data_dir`` that have both ``{name}.tsv`` and ``{name}.lbl``, sorted."""
    names = {f[:-4] for f in os.listdir(data_dir) if f.endswith(".tsv")}
    return sorted(n for n in names if os.path.isfile(os.path.join(data_dir, n + ".lbl")))


def parse_splits(spec: str, data_dir: str) -> SplitSpec:
    """``"auto"`` (folds over every labelled split in ``data_dir``), ``"a,b,c"`` (folds over those)
    or ``"train/test"`` (one fixed pair) -> :class:`SplitSpec`."""
    spec = spec.strip()
    if "/" in spec:
        train, _, test = spec.partition("/")
        if not train or not test or "/" in test:
            raise ValueError(f"split spec {spec!r}: expected 'TRAIN/TEST'")
        return SplitSpec(train=train, test=test)
    folds = available_splits(data_dir) if spec == "auto" else [s.strip() for s in spec.split(",") if s.strip()]
    if len(folds) < 2:
        raise ValueError(
            f"split spec {spec!r} in {data_dir}: leave-one-fold-out needs at least 2 labelled splits "
            f"(each a {{name}}.tsv with its {{name}}.lbl), found {folds}"
        )
    return SplitSpec(folds=folds)


@dataclass
class ProbeData:
    """A labelled set as fbank features, ready for any encoder.

    ``fbank`` holds each clip's UNPADDED, un-normalised log-mel ``(T_i, F)``; ``labels`` ``(N,)``;
    ``groups`` ``(N,)`` the index of each clip's split in ``split_names``; ``num_classes``;
    ``label_lines`` each clip's line in its split's ``.lbl`` (for messages; empty when not read from files).
    """

    fbank: list[Tensor]
    labels: Tensor
    groups: Tensor
    split_names: list[str]
    spec: SplitSpec
    num_classes: int
    class_names: list[str]
    sample_rate: int = 16000
    label_lines: list[int] = field(default_factory=list)
    data_dir: str = ""
    max_per_split: Optional[int] = None

    def __len__(self) -> int:
        return len(self.fbank)

    def subset(self, max_per_split: int) -> "ProbeData":
        """At most ``max_per_split`` evenly spaced clips of every split (deterministic)."""
        keep: list[int] = []
        for g in range(len(self.split_names)):
            rows = (self.groups == g).nonzero().flatten().tolist()
            keep.extend(rows[i] for i in evenly_spaced(len(rows), max_per_split))
        return self.take(keep)

    def take(self, rows: Sequence[int]) -> "ProbeData":
        """The clips ``rows`` (indices into this set), in that order."""
        rows = list(rows)
        return dataclasses.replace(
            self, fbank=[self.fbank[i] for i in rows], labels=self.labels[rows], groups=self.groups[rows],
            label_lines=[self.label_lines[i] for i in rows] if self.label_lines else [],
        )


def evenly_spaced(n: int, m: Optional[int]) -> list[int]:
    """``m`` indices spread evenly over ``range(n)`` (all of them when ``m`` is None or >= n).

    Manifests are often sorted by class (FSDD: by digit), so "the first m rows" would be one class.
    """
    if m is None or m >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, m).round()})


def _check_header(row: ManifestRow, tsv: str) -> None:
    """Open a row through the row reader without decoding its samples: the file (or span, or shard
    member) exists, its header parses and it holds at least one frame. Errors name manifest and line."""
    with open_clip(row, tsv) as clip:
        if clip.frames <= 0:
            raise AudioError(f"audio {row.describe()} (manifest {tsv}, line {row.line}) contains no samples")


def load_probe_data(
    data_dir: str,
    splits: str | SplitSpec = "auto",
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    max_per_split: Optional[int] = None,
    check_all_rows: bool = False,
) -> ProbeData:
    """Read the labelled splits of ``data_dir`` (``{split}.tsv`` + ``{split}.lbl`` +
    ``label_descriptors.csv``; single-label) and compute the fbank of the clips used once.

    Every label line is parsed, also of the clips left out by ``max_per_split``. With
    ``check_all_rows`` the rows left out are opened too (header only: existence, format, a frame
    count), so a broken clip anywhere in the set is reported, not only in the clips used.
    """
    spec = parse_splits(splits, data_dir) if isinstance(splits, str) else splits
    features = FeatureConfig(sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_length=None)
    label_set = read_label_descriptors(os.path.join(data_dir, "label_descriptors.csv"))
    fbank: list[Tensor] = []
    labels: list[int] = []
    groups: list[int] = []
    lines: list[int] = []
    names = spec.names()
    for g, name in enumerate(names):
        tsv = os.path.join(data_dir, f"{name}.tsv")
        if not os.path.isfile(tsv):
            raise FileNotFoundError(f"probe split {name!r}: {tsv} does not exist")
        rows = read_manifest_rows(tsv)
        per_row = read_split_labels(os.path.join(data_dir, f"{name}.lbl"), label_set, tsv, multi_label=False)
        keep = set(evenly_spaced(len(rows), max_per_split))
        for i, (row, lab) in enumerate(zip(rows, per_row)):
            if i not in keep:
                if check_all_rows:
                    _check_header(row, tsv)
                continue
            # the one row reader: spans read their frames only, shard members their bytes
            wave, sr = read_row(row, tsv)
            fbank.append(fbank_of(to_mono_16k(wave, sr, sample_rate), sample_rate, features))
            labels.append(lab[0])
            groups.append(g)
            lines.append(i + 1)  # label line i + 1 belongs to manifest row i (read_split_labels checks it)
    return ProbeData(
        fbank=fbank,
        labels=torch.tensor(labels, dtype=torch.long),
        groups=torch.tensor(groups, dtype=torch.long),
        split_names=names,
        spec=spec,
        num_classes=len(label_set),
        class_names=list(label_set.labels),
        sample_rate=sample_rate,
        label_lines=lines,
        data_dir=data_dir,
        max_per_split=max_per_split,
    )


def check_fold_classes(data: ProbeData) -> None:
    """Raise :class:`ProbeDataError` when a class of some fold's test side has no clip on its train
    side: the classifier could never predict it, so the accuracy would be capped without saying so.

    For leave-one-split-out that means every class present needs clips in at least two splits. The
    message names the label file and line of the first such clip. A split without clips is refused
    too (its fold would have nothing to test, or nothing to train on).
    """
    for g, split in enumerate(data.split_names):
        if not bool((data.groups == g).any()):
            raise ProbeDataError(f"{os.path.join(data.data_dir, split + '.tsv')}: probe split {split!r} has no clips")
    for train, test, _ in _folds(data):
        missing = set(data.labels[test].tolist()) - set(data.labels[train].tolist())
        if not missing:
            continue
        first = min(int(i) for i in test if int(data.labels[i]) in missing)
        split = data.split_names[int(data.groups[first])]
        where = os.path.join(data.data_dir, f"{split}.lbl")
        line = f":{data.label_lines[first]}" if data.label_lines else ""
        name = data.class_names[int(data.labels[first])]
        cap = f" among the clips used (at most {data.max_per_split} per split)" if data.max_per_split else ""
        if data.spec.folds:
            why = (f"class {name!r} has clips only in probe split {split!r}{cap}, so the fold that tests on "
                   f"{split!r} never trains on it: every class needs clips in at least two splits")
        else:
            why = f"class {name!r} of the test split {split!r} has no clip in the train split {data.spec.train!r}{cap}"
        raise ProbeDataError(f"{where}{line}: {why}")


# --------------------------------------------------------------------------------------------------
# features


def _pool(h: Tensor, real_patches: Tensor, num_freq: int, pooling: str) -> Tensor:
    """Pool one block output ``(B, 1+H*W, D)`` over the first ``real_patches`` time patches."""
    b, _, d = h.shape
    if pooling == "cls":
        return h[:, 0]
    grid = h[:, 1:].reshape(b, -1, num_freq, d)  # (B, H, W, D)
    keep = (torch.arange(grid.shape[1], device=h.device)[None, :] < real_patches[:, None]).to(h.dtype)[:, :, None, None]
    count = keep.sum(1).clamp(min=1)  # (B, 1, 1)
    col = (grid * keep).sum(1) / count  # (B, W, D)
    if pooling == "mean":
        return col.mean(1)
    if pooling == "freq":
        return col.reshape(b, num_freq * d)
    if pooling == "freqstd":  # population std over the real time patches, as logmel-meanstd's
        var = ((grid - col[:, None]) ** 2 * keep).sum(1) / count
        return torch.cat([col.reshape(b, num_freq * d), var.sqrt().reshape(b, num_freq * d)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.no_grad()
def encoder_features(
    encoder: EATEncoder,
    data: ProbeData,
    feat: FeatureConfig,
    layers: Sequence[int],
    poolings: Sequence[str] = POOLINGS,
    target_length: Optional[int] = None,
    pool_padding: bool = False,
    batch_size: int = 32,
    natural_length: bool = False,
) -> dict[tuple[int, str], Tensor]:
    """Pooled features of every clip: ``{(layer, pooling): (N, dim)}`` (float32, on the CPU).

    ``layers`` are 0-based block indices (negative counts from the end). Inputs are padded/cropped to
    ``target_length`` (default ``feat.target_length``) and normalised with ``feat``'s statistics, as
    in training. With ``natural_length`` a clip is only padded up to the next whole patch (and still
    cropped to ``target_length``), so a short clip is not described mostly by padding the encoder
    attends to; clips of equal padded length are batched together. The encoder runs in eval mode;
    its mode is restored afterwards.

    Only the blocks up to the deepest layer asked for run, and only the outputs of the layers asked
    for are pooled; the other blocks' outputs are dropped as soon as the next block has run, so
    probing block L holds about one block output, not L of them. The pooled features are copies, so
    no batch's block output outlives its batch (``h[:, 0]`` alone would keep it alive).
    """
    depth = len(encoder.blocks)
    layers = sorted({l % depth for l in layers})
    length = int(target_length or feat.target_length or DEFAULT_TARGET_LENGTH)
    ps = encoder.cfg.patch_size
    if length % ps:
        raise ValueError(f"target_length {length} is not a multiple of the patch size {ps}")
    real = torch.tensor([min(fb.shape[0], length) for fb in data.fbank], dtype=torch.long)
    real_patches = (real + ps - 1) // ps
    padded = real_patches * ps if natural_length else torch.full_like(real, length)
    if pool_padding:
        real_patches = padded // ps
    num_freq = encoder.cfg.grid_w
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    out: dict[tuple[int, str], list[Tensor]] = {(l, p): [] for l in layers for p in poolings}
    out_layers = set(layers)
    order: list[int] = []
    was_training = encoder.training
    encoder.eval()
    try:
        for frames in sorted(set(padded.tolist())):
            rows = (padded == frames).nonzero().flatten().tolist()
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                window = dataclasses.replace(feat, target_length=frames)
                chunk = to_window(torch.stack([pad_or_crop(data.fbank[i], frames) for i in idx]), window)
                chunk = chunk.to(device=device, dtype=dtype)
                rp = real_patches[idx].to(device)
                for l, h in enumerate(encoder.iter_hidden_states(chunk, num_blocks=layers[-1] + 1)):
                    if l in out_layers:
                        h = h.float()
                        for p in poolings:
                            out[(l, p)].append(_pool(h, rp, num_freq, p).to("cpu", copy=True))
                    del h
                order.extend(idx)
    finally:
        encoder.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {k: torch.cat(v)[inverse] for k, v in out.items()}


def cropped_clips(data: ProbeData, target_length: int) -> int:
    """How many clips are longer than ``target_length`` frames (the probe sees only their start)."""
    return sum(int(fb.shape[0] > target_length) for fb in data.fbank)


def logmel_features(data: ProbeData, feat: FeatureConfig, target_length: Optional[int] = None) -> dict[str, Tensor]:
    """Baseline features from the normalised fbank over each clip's real frames (within the window):
    ``logmel-mean`` ``(N, F)`` and ``logmel-meanstd`` ``(N, 2F)``."""
    length = int(target_length or feat.target_length or DEFAULT_TARGET_LENGTH)
    means, stds = [], []
    for fb in data.fbank:
        x = normalize(fb[:length], feat.norm_mean, feat.norm_std)
        means.append(x.mean(0))
        stds.append(x.std(0, unbiased=False))
    mean = torch.stack(means)
    return {"logmel-mean": mean, "logmel-meanstd": torch.cat([mean, torch.stack(stds)], dim=1)}


# --------------------------------------------------------------------------------------------------
# classifiers


def _standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp(min=1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_logistic(
    x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 100,
    init: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression ``(W (dim, C), b (C,))`` minimising mean cross-entropy +
    ``l2 / 2 * ||W||^2`` with L-BFGS (strong Wolfe), from zeros or from ``init`` (a warm start).

    The problem is convex, so the result does not depend on any random state.
    """
    w0, b0 = init if init is not None else (x.new_zeros(x.shape[1], num_classes), x.new_zeros(num_classes))
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=1e-7,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def logreg_accuracy(
    xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, num_classes: int,
    val_mask: Union[Tensor, Sequence[Tensor]], l2_grid: Sequence[float] = L2_GRID,
) -> tuple[float, float]:
    """Accuracy on the test set of a standardised logistic regression whose L2 strength is chosen on
    the training rows where ``val_mask`` is True (fitted on the others), then refitted on all
    training rows. Several masks: the strength with the best mean accuracy over them. Returns
    ``(accuracy, chosen l2)``.

    The grid is walked from the strongest to the weakest penalty, each fit warm-started from the
    previous one (a regularisation path), which makes the search a few times cheaper.
    """
    grid = sorted(l2_grid, reverse=True)
    masks = [val_mask] if isinstance(val_mask, Tensor) else list(val_mask)
    masks = [m for m in masks if bool(m.any()) and bool((~m).any())]
    if len(grid) > 1 and masks:
        total = np.zeros(len(grid))
        for m in masks:
            a, v = _standardize(xtr[~m], xtr[m])
            params = None
            for i, l2 in enumerate(grid):
                params = fit_logistic(a, ytr[~m], num_classes, l2, init=params)
                total[i] += float(((v @ params[0] + params[1]).argmax(1) == ytr[m]).float().mean())
        l2 = grid[int(np.argmax(total))]
    else:
        l2 = grid[len(grid) // 2]
    tr, te = _standardize(xtr, xte)
    w, b = fit_logistic(tr, ytr, num_classes, l2)
    return float(((te @ w + b).argmax(1) == yte).float().mean()), l2


def knn_accuracy(xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, num_classes: int,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Weighted kNN on standardised, L2-normalised features (cosine similarity)."""
    tr, te = _standardize(xtr, xte)
    tr, te = F.normalize(tr, dim=1), F.normalize(te, dim=1)
    sim = te @ tr.T  # (Nte, Ntr)
    k = min(k, tr.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(te.shape[0], num_classes)
    votes.scatter_add_(1, ytr[idx], torch.exp(top / temperature))
    return float((votes.argmax(1) == yte).float().mean())


L2_FOLDS = ("next", "others")


def _folds(data: ProbeData, l2_folds: str = "next") -> list[tuple[Tensor, Tensor, list[Tensor]]]:
    """``(train rows, test rows, validation masks over the train rows)`` per fold: the next fold
    (``l2_folds="next"``) or every other training fold (``"others"``) picks the L2 strength."""
    if l2_folds not in L2_FOLDS:
        raise ValueError(f"l2_folds must be one of {L2_FOLDS}, got {l2_folds!r}")
    out = []
    g = data.groups
    if data.spec.folds:
        n = len(data.split_names)
        for k in range(n):
            train = (g != k).nonzero().flatten()
            test = (g == k).nonzero().flatten()
            # held out like the test fold
            val_groups = [(k + 1) % n] if l2_folds == "next" else [j for j in range(n) if j != k]
            out.append((train, test, [g[train] == j for j in val_groups]))
    else:
        train = (g == 0).nonzero().flatten()
        test = (g == 1).nonzero().flatten()
        # every 5th training clip (deterministic) validates the L2 strength
        val = torch.zeros(len(train), dtype=torch.bool)
        val[::5] = True
        out.append((train, test, [val]))
    return out


def evaluate_features(x: Tensor, data: ProbeData, knn: bool = True, logreg: bool = True,
                      l2_folds: str = "next") -> dict[str, Any]:
    """Both classifiers on one feature matrix ``(N, dim)`` over the folds of ``data`` (``l2_folds``:
    :func:`_folds`).

    Returns ``{"logreg": mean, "logreg_std", "logreg_folds": [...], "knn": ..., ...}``.
    """
    y = data.labels
    res: dict[str, Any] = {}
    lr_acc, knn_acc = [], []
    for train, test, val in _folds(data, l2_folds):
        if logreg:
            lr_acc.append(logreg_accuracy(x[train], y[train], x[test], y[test], data.num_classes, val)[0])
        if knn:
            knn_acc.append(knn_accuracy(x[train], y[train], x[test], y[test], data.num_classes))
    for name, accs in (("logreg", lr_acc), ("knn", knn_acc)):
        if accs:
            res[name] = float(np.mean(accs))
            res[name + "_std"] = float(np.std(accs))
            res[name + "_folds"] = [round(a, 4) for a in accs]
    return res


# --------------------------------------------------------------------------------------------------
# rows


@dataclass
class ProbeResult:
    """One row of a probe table."""

    model: str
    layer: Optional[int]
    pooling: str
    dim: int
    logreg: Optional[float] = None
    logreg_std: Optional[float] = None
    knn: Optional[float] = None
    knn_std: Optional[float] = None
    logreg_folds: list[float] = field(default_factory=list)
    knn_folds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe_encoder(
    name: str,
    encoder: EATEncoder,
    data: ProbeData,
    feat: FeatureConfig,
    layers: Iterable[int],
    poolings: Sequence[str] = POOLINGS,
    target_length: Optional[int] = None,
    pool_padding: bool = False,
    knn: bool = True,
    logreg: bool = True,
    batch_size: int = 32,
    natural_length: bool = False,
    l2_folds: str = "next",
) -> list[ProbeResult]:
    """Probe rows for one encoder: every (layer, pooling) pair."""
    feats = encoder_features(encoder, data, feat, list(layers), poolings, target_length, pool_padding, batch_size,
                             natural_length)
    rows = []
    for (layer, pooling), x in sorted(feats.items()):
        rows.append(ProbeResult(name, layer, pooling, x.shape[1], **evaluate_features(x, data, knn, logreg, l2_folds)))
    return rows


def probe_logmel(data: ProbeData, feat: FeatureConfig, target_length: Optional[int] = None,
                 knn: bool = True, logreg: bool = True, l2_folds: str = "next") -> list[ProbeResult]:
    """The log-mel baseline rows."""
    return [ProbeResult("logmel", None, pooling, x.shape[1], **evaluate_features(x, data, knn, logreg, l2_folds))
            for pooling, x in logmel_features(data, feat, target_length).items()]


def format_table(rows: Sequence[ProbeResult]) -> str:
    """A fixed-width text table (accuracies in %, mean +- std over folds)."""

    def cell(mean: Optional[float], std: Optional[float]) -> str:
        if mean is None:
            return "-"
        return f"{100 * mean:5.1f} +- {100 * (std or 0.0):4.1f}"

    header = f"{'model':<28} {'layer':>5} {'pooling':<15} {'dim':>6}  {'logreg %':>13}  {'knn %':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{r.model[:28]:<28} {layer:>5} {r.pooling:<15} {r.dim:>6}  "
                     f"{cell(r.logreg, r.logreg_std):>13}  {cell(r.knn, r.knn_std):>13}")
    return "\n".join(lines)


def chance_level(data: ProbeData) -> float:
    """Accuracy of always predicting the most frequent class (a floor for every row)."""
    counts = torch.bincount(data.labels, minlength=data.num_classes).float()
    return float(counts.max() / counts.sum()) if len(data) else math.nan


# --------------------------------------------------------------------------------------------------
# online probe (during pre-training)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without disturbing the global random number generators: torch (CPU, and the
    current CUDA device once CUDA is up), numpy and Python's ``random`` are restored afterwards.

    The online probe works on rank 0 only and between training steps; if it drew from a global
    stream, rank 0 would diverge from the others and a run with the probe from one without.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class OnlineProbe:
    """A cheap probe run periodically during pre-training: one layer and pooling, both classifiers.

    :meth:`prepare` validates the whole labelled set and computes the fbank of the clips used once;
    the pre-training task calls it at set-up, so a broken set stops a run before its first update
    (:meth:`data` prepares on first use for callers that do not). :meth:`run` leaves every random
    number generator (torch CPU and CUDA, numpy, Python) and the encoders' train/eval modes as it
    found them, so a run with the probe trains exactly like one without.
    """

    def __init__(
        self,
        data_dir: str,
        feat: FeatureConfig,
        splits: str = "auto",
        layer: int = -1,
        pooling: str = "freq",
        max_per_split: Optional[int] = None,
        target_length: Optional[int] = None,
        logmel_baseline: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"probe pooling must be one of {POOLINGS}, got {pooling!r}")
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"probe data folder {data_dir} does not exist")
        self.data_dir = data_dir
        self.feat = feat
        self.spec = parse_splits(splits, data_dir)  # fail at start-up, not at the first probe
        self.layer = layer
        self.pooling = pooling
        self.max_per_split = max_per_split
        self.target_length = target_length
        self.logmel_baseline = logmel_baseline
        self._data: Optional[ProbeData] = None
        self._baseline: Optional[dict[str, float]] = None

    def prepare(self) -> ProbeData:
        """Check the whole labelled set and load the clips used; raise :class:`ProbeDataError`.

        Checked: every split exists, every label line parses (known class, one per clip, ids match
        the manifest rows), every clip used decodes (it is read in full, as the probe reads it) and
        every other row opens through the row reader (header only), and each fold's test classes
        occur on its train side. Done once; global random number generators are left untouched.
        """
        if self._data is None:
            try:
                with isolated_rng():
                    data = load_probe_data(self.data_dir, self.spec, self.feat.sample_rate,
                                           self.feat.num_mel_bins, self.max_per_split, check_all_rows=True)
                check_fold_classes(data)
            except ProbeDataError:
                raise
            except Exception as exc:
                raise ProbeDataError.wrap(self.data_dir, exc) from exc
            self._data = data
        return self._data

    @property
    def data(self) -> ProbeData:
        return self.prepare()

    def describe(self) -> str:
        """One line for the log: clips, splits, folds, classes."""
        data = self.data
        folds = len(data.split_names) if data.spec.folds else 1
        cap = f"at most {self.max_per_split} per split" if self.max_per_split else "all clips"
        return (f"{len(data)} clips ({cap}) of {len(data.split_names)} splits, {folds} fold(s), "
                f"{len(set(data.labels.tolist()))} classes, block {self.layer}, {self.pooling} pooling")

    def _features(self, encoder: EATEncoder, data: ProbeData) -> Tensor:
        return encoder_features(encoder, data, self.feat, [self.layer], [self.pooling],
                                self.target_length)[(self.layer % len(encoder.blocks), self.pooling)]

    def estimate_seconds(self, encoder: EATEncoder, num_encoders: int = 2, device: Optional[torch.device] = None,
                         sample_clips: int = 8) -> dict[str, float]:
        """Seconds one :meth:`run` over ``num_encoders`` encoders like ``encoder`` will take, measured.

        The encoder's forward is timed on ``sample_clips`` clips (after one warm-up pass) on
        ``device`` (default: where the encoder is; a copy is moved there otherwise, e.g. when the
        trainer has not moved the model yet) and scaled to every clip; the classifiers are timed on
        the first fold with random features of the probe's width and scaled to every fold. Returns
        ``{"features": s, "classifiers": s, "total": s}``. Clips are padded to the full window here
        as in :meth:`run`, so the per-clip time does not depend on which clips are sampled.
        """
        data = self.data
        here = next(encoder.parameters()).device
        with isolated_rng():
            enc = encoder if device is None or torch.device(device) == here else copy.deepcopy(encoder).to(device)
            few = data.take(range(min(sample_clips, len(data))))
            self._features(enc, few)  # warm-up: first-call allocations, kernel selection
            start = time.perf_counter()
            width = self._features(enc, few).shape[1]
            per_clip = (time.perf_counter() - start) / max(len(few), 1)
            del enc
            x = torch.randn(len(data), width, generator=torch.Generator().manual_seed(0))
            folds = _folds(data)
            train, test, val = folds[0]
            start = time.perf_counter()
            logreg_accuracy(x[train], data.labels[train], x[test], data.labels[test], data.num_classes, val)
            knn_accuracy(x[train], data.labels[train], x[test], data.labels[test], data.num_classes)
            per_fold = time.perf_counter() - start
        features = per_clip * len(data) * num_encoders
        classifiers = per_fold * len(folds) * num_encoders
        return {"features": features, "classifiers": classifiers, "total": features + classifiers}

    def baseline(self) -> dict[str, float]:
        """``{"probe_logmel_logreg": acc, "probe_logmel_knn": acc}``: the log-mel baseline on the same
        clips, window and folds, each classifier's better of ``logmel-mean`` and ``logmel-meanstd`` (as
        eat-probe's tables compare). It does not change during training, so it is computed once; logged
        beside every probe, it is the line a pre-training curve has to cross to be worth its cost."""
        if self._baseline is None:
            with isolated_rng():
                rows = probe_logmel(self.data, self.feat, self.target_length)
            self._baseline = {f"probe_logmel_{c}": max(getattr(r, c) for r in rows) for c in ("logreg", "knn")}
        return dict(self._baseline)

    def run(self, encoders: dict[str, EATEncoder]) -> dict[str, float]:
        """``{"probe_{name}_logreg": acc, "probe_{name}_knn": acc}`` for every named encoder, plus the
        log-mel baseline's (:meth:`baseline`) unless ``logmel_baseline`` is off."""
        out: dict[str, float] = {}
        with isolated_rng():
            data = self.data
            for name, enc in encoders.items():
                res = evaluate_features(self._features(enc, data), data)
                out[f"probe_{name}_logreg"] = res["logreg"]
                out[f"probe_{name}_knn"] = res["knn"]
        if self.logmel_baseline:
            out.update(self.baseline())
        return out
