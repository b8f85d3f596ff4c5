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
  model is refitted on all training data;
- ``knn``: standardised and L2-normalised features, the 20 most cosine-similar training clips vote
  with weights ``exp(sim / 0.07)`` (the DINO / solo-learn kNN).

Evaluation is either leave-one-fold-out over several labelled splits (e.g. one split per speaker, so
speakers are held out) or one fixed train/test pair. Results are mean and std over folds.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eat_fairseq.data.audio import to_mono_16k
from eat_fairseq.data.clips import read_row
from eat_fairseq.model.encoder import EATEncoder
from eat_fairseq.data.features import FeatureConfig, fbank_of, normalize, pad_or_crop, to_window
from eat_fairseq.data.labels import read_label_descriptors, read_split_labels
from eat_fairseq.data.manifest import read_manifest

__all__ = [
    "POOLINGS",
    "LOGMEL_POOLINGS",
    "ProbeData",
    "ProbeResult",
    "SplitSpec",
    "parse_splits",
    "load_probe_data",
    "encoder_features",
    "logmel_features",
    "fit_logistic",
    "logreg_accuracy",
    "knn_accuracy",
    "evaluate_features",
    "probe_encoder",
    "format_table",
    "chance_level",
    "probe_logmel",
    "available_splits",
]

POOLINGS = ("cls", "mean", "freq", "freqstd")
LOGMEL_POOLINGS = ("logmel-mean", "logmel-meanstd")
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
KNN_K = 20
KNN_TEMPERATURE = 0.07


# --------------------------------------------------------------------------------------------------
# data


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
    ``groups`` ``(N,)`` the index of each clip's split in ``split_names``; ``num_classes``.
    """

    fbank: list[Tensor]
    labels: Tensor
    groups: Tensor
    split_names: list[str]
    spec: SplitSpec
    num_classes: int
    class_names: list[str]
    sample_rate: int = 16000

    def __len__(self) -> int:
        return len(self.fbank)

    def subset(self, max_per_split: int) -> "ProbeData":
        """At most ``max_per_split`` evenly spaced clips of every split (deterministic)."""
        keep: list[int] = []
        for g in range(len(self.split_names)):
            rows = (self.groups == g).nonzero().flatten().tolist()
            keep.extend(rows[i] for i in evenly_spaced(len(rows), max_per_split))
        return dataclasses.replace(
            self, fbank=[self.fbank[i] for i in keep], labels=self.labels[keep], groups=self.groups[keep]
        )


def evenly_spaced(n: int, m: Optional[int]) -> list[int]:
    """``m`` indices spread evenly over ``range(n)`` (all of them when ``m`` is None or >= n).

    Manifests are often sorted by class (FSDD: by digit), so "the first m rows" would be one class.
    """
    if m is None or m >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, m).round()})


def load_probe_data(
    data_dir: str,
    splits: str | SplitSpec = "auto",
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    max_per_split: Optional[int] = None,
) -> ProbeData:
    """Read the labelled splits of ``data_dir`` (``{split}.tsv`` + ``{split}.lbl`` +
    ``label_descriptors.csv``; single-label) and compute every clip's fbank once."""
    spec = parse_splits(splits, data_dir) if isinstance(splits, str) else splits
    features = FeatureConfig(sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_length=None)
    label_set = read_label_descriptors(os.path.join(data_dir, "label_descriptors.csv"))
    fbank: list[Tensor] = []
    labels: list[int] = []
    groups: list[int] = []
    names = spec.names()
    for g, name in enumerate(names):
        tsv = os.path.join(data_dir, f"{name}.tsv")
        if not os.path.isfile(tsv):
            raise FileNotFoundError(f"probe split {name!r}: {tsv} does not exist")
        _, rows = read_manifest(tsv)
        per_row = read_split_labels(os.path.join(data_dir, f"{name}.lbl"), label_set, tsv, multi_label=False)
        keep = evenly_spaced(len(rows), max_per_split)
        for row, lab in ((rows[i], per_row[i]) for i in keep):
            # the one row reader: spans read their frames only, shard members their bytes
            wave, sr = read_row(row, tsv)
            fbank.append(fbank_of(to_mono_16k(wave, sr, sample_rate), sample_rate, features))
            labels.append(lab[0])
            groups.append(g)
    return ProbeData(
        fbank=fbank,
        labels=torch.tensor(labels, dtype=torch.long),
        groups=torch.tensor(groups, dtype=torch.long),
        split_names=names,
        spec=spec,
        num_classes=len(label_set),
        class_names=list(label_set.labels),
        sample_rate=sample_rate,
    )


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
    """
    depth = len(encoder.blocks)
    layers = sorted({l % depth for l in layers})
    length = int(target_length or feat.target_length or 1024)
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
                hidden = encoder.hidden_states(chunk, num_blocks=layers[-1] + 1)
                for l in layers:
                    h = hidden[l].float()
                    for p in poolings:
                        out[(l, p)].append(_pool(h, rp, num_freq, p).cpu())
                order.extend(idx)
    finally:
        encoder.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {k: torch.cat(v)[inverse] for k, v in out.items()}


def logmel_features(data: ProbeData, feat: FeatureConfig, target_length: Optional[int] = None) -> dict[str, Tensor]:
    """Baseline features from the normalised fbank over each clip's real frames (within the window):
    ``logmel-mean`` ``(N, F)`` and ``logmel-meanstd`` ``(N, 2F)``."""
    length = int(target_length or feat.target_length or 1024)
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
    xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, num_classes: int, val_mask: Tensor,
    l2_grid: Sequence[float] = L2_GRID,
) -> tuple[float, float]:
    """Accuracy on the test set of a standardised logistic regression whose L2 strength is chosen on
    the training rows where ``val_mask`` is True (fitted on the others), then refitted on all
    training rows. Returns ``(accuracy, chosen l2)``.

    The grid is walked from the strongest to the weakest penalty, each fit warm-started from the
    previous one (a regularisation path), which makes the search a few times cheaper.
    """
    grid = sorted(l2_grid, reverse=True)
    if len(grid) > 1 and bool(val_mask.any()) and bool((~val_mask).any()):
        a, v = _standardize(xtr[~val_mask], xtr[val_mask])
        scores, params = [], None
        for l2 in grid:
            params = fit_logistic(a, ytr[~val_mask], num_classes, l2, init=params)
            scores.append(float(((v @ params[0] + params[1]).argmax(1) == ytr[val_mask]).float().mean()))
        l2 = grid[int(np.argmax(scores))]
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


def _folds(data: ProbeData) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(train rows, test rows, validation mask over the train rows)`` per fold."""
    out = []
    g = data.groups
    if data.spec.folds:
        n = len(data.split_names)
        for k in range(n):
            train = (g != k).nonzero().flatten()
            test = (g == k).nonzero().flatten()
            val_group = (k + 1) % n  # one other fold picks the L2 strength: held out like the test fold
            out.append((train, test, g[train] == val_group))
    else:
        train = (g == 0).nonzero().flatten()
        test = (g == 1).nonzero().flatten()
        # every 5th training clip (deterministic) validates the L2 strength
        val = torch.zeros(len(train), dtype=torch.bool)
        val[::5] = True
        out.append((train, test, val))
    return out


def evaluate_features(x: Tensor, data: ProbeData, knn: bool = True, logreg: bool = True) -> dict[str, Any]:
    """Both classifiers on one feature matrix ``(N, dim)`` over the folds of ``data``.

    Returns ``{"logreg": mean, "logreg_std", "logreg_folds": [...], "knn": ..., ...}``.
    """
    y = data.labels
    res: dict[str, Any] = {}
    lr_acc, knn_acc = [], []
    for train, test, val in _folds(data):
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
) -> list[ProbeResult]:
    """Probe rows for one encoder: every (layer, pooling) pair."""
    feats = encoder_features(encoder, data, feat, list(layers), poolings, target_length, pool_padding, batch_size,
                             natural_length)
    rows = []
    for (layer, pooling), x in sorted(feats.items()):
        rows.append(ProbeResult(name, layer, pooling, x.shape[1], **evaluate_features(x, data, knn, logreg)))
    return rows


def probe_logmel(data: ProbeData, feat: FeatureConfig, target_length: Optional[int] = None,
                 knn: bool = True, logreg: bool = True) -> list[ProbeResult]:
    """The log-mel baseline rows."""
    return [ProbeResult("logmel", None, pooling, x.shape[1], **evaluate_features(x, data, knn, logreg))
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


class OnlineProbe:
    """A cheap probe run periodically during pre-training: one layer and pooling, both classifiers.

    The labelled set's fbank is computed once, on first use. :meth:`run` leaves every random
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
        self._data: Optional[ProbeData] = None

    @property
    def data(self) -> ProbeData:
        if self._data is None:
            self._data = load_probe_data(self.data_dir, self.spec, self.feat.sample_rate,
                                         self.feat.num_mel_bins, self.max_per_split)
        return self._data

    def run(self, encoders: dict[str, EATEncoder]) -> dict[str, float]:
        """``{"probe_{name}_logreg": acc, "probe_{name}_knn": acc}`` for every named encoder."""
        import random

        py_state, np_state = random.getstate(), np.random.get_state()
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        out: dict[str, float] = {}
        try:
            with torch.random.fork_rng(devices=cuda):
                data = self.data
                for name, enc in encoders.items():
                    x = encoder_features(enc, data, self.feat, [self.layer], [self.pooling],
                                         self.target_length)[(self.layer % len(enc.blocks), self.pooling)]
                    res = evaluate_features(x, data)
                    out[f"probe_{name}_logreg"] = res["logreg"]
                    out[f"probe_{name}_knn"] = res["knn"]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out
