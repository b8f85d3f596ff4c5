"""Training curves of a run folder as one PNG: loss terms, learning rate, validation metrics, and any
scalar whose name starts with ``probe_`` (online probes), each kind in its own panel.

Sources, in order of preference:

1. TensorBoard event files anywhere under the folder (every recipe writes them to
   ``{checkpoint.save_dir}/tb/{train_inner,train,valid}/`` through ``common.tensorboard_logdir``).
   They are read by a small reader here (TFRecord framing + the few protobuf fields a scalar uses),
   so plotting needs neither tensorboard nor tensorboardX;
2. otherwise fairseq's text logs (``hydra_train.log``, ``train.log`` or any ``*.log`` in the folder,
   or a log file given directly), in either ``common.log_format=json`` or ``simple``.

A scalar is a series ``(tag, name) -> [(update, value), ...]``; the tag is the logging context
(``train_inner``: every ``log_interval`` updates; ``train``: end of epoch; ``valid`` or another
subset name: validation). Which panel a name goes to is decided from the name alone (:func:`panel_of`),
so new scalars (e.g. a probe's ``probe_pos_share``) are plotted without changes here.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Optional

__all__ = ["RunScalars", "read_run", "read_event_file", "read_text_log", "panel_of", "panels", "drawn_series",
           "BaselineCrossing", "baseline_crossings", "plot_run"]

Series = dict[tuple[str, str], dict[int, float]]

# logged numbers that are bookkeeping, not curves worth a panel
IGNORED = frozenset({
    "epoch", "update", "num_updates", "wps", "ups", "wpb", "bsz", "wall", "train_wall", "gb_free", "loss_scale",
    "n_eval", "_correct", "clip", "oom", "ntokens", "nsentences", "sample_size", "masked_pct", "ema_decay",
    "skipped_files", "gnorm",
})
VALIDATION_METRICS = ("accuracy", "mAP", "auc")


@dataclass
class RunScalars:
    """Scalars of one run and where they came from (``"tensorboard"`` or ``"text log"``)."""

    series: Series = field(default_factory=dict)
    source: str = ""
    files: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted({name for _, name in self.series})


# ------------------------------------------------------------------------------------------------
# TensorBoard event files


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a protobuf message; value is an int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:  # groups (3, 4) are not used by event files
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _tensor_value(buf: bytes) -> Optional[float]:
    """First float of a TensorProto (``float_val``/``double_val``/``tensor_content`` of a float tensor)."""
    dtype, content = 1, b""
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = int(value)  # type: ignore[arg-type]
        elif number == 4 and wire == 2:
            content = value  # type: ignore[assignment]
        elif number == 5:  # float_val (packed or not: the first 4 bytes are the first value)
            return struct.unpack("<f", value[:4])[0]  # type: ignore[index]
        elif number == 6:  # double_val
            return struct.unpack("<d", value[:8])[0]  # type: ignore[index]
    if content and dtype == 1:
        return struct.unpack("<f", content[:4])[0]
    if content and dtype == 2:
        return struct.unpack("<d", content[:8])[0]
    return None


def read_event_file(path: str) -> Iterator[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in a TensorBoard event file.

    Records are ``uint64 length, uint32 crc, data, uint32 crc``; an incomplete last record (a file
    still being written) ends the file. Event fields used: ``step`` (2) and ``summary`` (5), whose
    values (1) carry ``tag`` (1) and ``simple_value`` (2) or a ``tensor`` (8).
    """
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = handle.read(length)
            if len(data) < length or len(handle.read(4)) < 4:
                return
            step, summary = 0, b""
            for number, _, value in _fields(data):
                if number == 2:
                    step = int(value)  # type: ignore[arg-type]
                elif number == 5:
                    summary = value  # type: ignore[assignment]
            for number, _, value in _fields(summary):
                if number != 1:
                    continue
                tag, scalar = "", None
                for vnum, vwire, vval in _fields(value):  # type: ignore[arg-type]
                    if vnum == 1:
                        tag = vval.decode("utf-8", "replace")  # type: ignore[union-attr]
                    elif vnum == 2 and vwire == 5:
                        scalar = struct.unpack("<f", vval)[0]  # type: ignore[arg-type]
                    elif vnum == 8:
                        scalar = _tensor_value(vval)  # type: ignore[arg-type]
                if tag and scalar is not None:
                    yield step, tag, float(scalar)


def _event_files(folder: str) -> list[str]:
    files = glob.glob(os.path.join(folder, "**", "*tfevents*"), recursive=True)

    def started(path: str) -> tuple[float, str]:
        match = re.search(r"tfevents\.(\d+(?:\.\d+)?)", os.path.basename(path))
        return (float(match.group(1)) if match else 0.0, path)

    return sorted(files, key=started)  # a resumed run's later file wins for repeated updates


def _read_tensorboard(folder: str) -> RunScalars:
    run = RunScalars(source="tensorboard")
    for path in _event_files(folder):
        # the writer's folder name is fairseq's logging tag: .../tb/train_inner/events.out...
        tag = os.path.basename(os.path.dirname(path))
        for step, name, value in read_event_file(path):
            run.series.setdefault((tag, name), {})[step] = value
        run.files.append(path)
    return run


# ------------------------------------------------------------------------------------------------
# fairseq text logs

_JSON_TAG = re.compile(r"\[(train_inner|train|valid[\w.-]*|[\w.-]+)\]\[INFO\] - (\{.*\})\s*$")
_SIMPLE_INNER = re.compile(r"epoch \d+:\s+\d+\s*/\s*\d+\s+(.*)$")
_SIMPLE_VALID = re.compile(r"epoch \d+ \| valid on '([^']+)' subset \| (.*)$")


def _number(text: object) -> Optional[float]:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_text_log(path: str, run: Optional[RunScalars] = None) -> RunScalars:
    """Scalars of a fairseq log (json or simple format); ``train_inner``, ``train`` and validation lines."""
    run = run if run is not None else RunScalars(source="text log")
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stats: dict[str, object] = {}
            tag = ""
            match = _JSON_TAG.search(line)
            if match and match.group(1) not in ("fairseq_cli.train", "fairseq.trainer"):
                tag = match.group(1)
                try:
                    stats = json.loads(match.group(2))
                except ValueError:
                    continue
                prefix = f"{tag}_"
                stats = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in stats.items()}
            elif (match := _SIMPLE_VALID.search(line)) is not None:
                tag = match.group(1)
                stats = dict(part.strip().split(" ", 1) for part in match.group(2).split(" | ") if " " in part.strip())
            elif (match := _SIMPLE_INNER.search(line)) is not None:
                tag = "train_inner"
                stats = dict(part.strip().split("=", 1) for part in match.group(1).split(",") if "=" in part)
            step = _number(stats.get("num_updates")) if stats else None
            if step is None:
                continue
            for name, raw in stats.items():
                value = _number(raw)
                if value is not None and name not in ("num_updates", "epoch"):
                    run.series.setdefault((tag, name), {})[int(step)] = value
    run.files.append(path)
    return run


def read_run(path: str) -> RunScalars:
    """Scalars of a run folder (event files first, else text logs) or of one log file.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` when nothing plottable is found.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        run = read_text_log(path)
    else:
        run = _read_tensorboard(path)
        if not run.series:
            logs = sorted(glob.glob(os.path.join(path, "*.log")))
            run = RunScalars(source="text log")
            for log in logs:
                read_text_log(log, run)
    if not run.series:
        raise ValueError(
            f"{path}: no training scalars found (no TensorBoard event files under it, and no fairseq "
            "log lines in *.log files there); recipes write them to {checkpoint.save_dir}/tb"
        )
    return run


# ------------------------------------------------------------------------------------------------
# plotting


LR_NAMES = ("lr", "real_lr", "real_lr_min")
PROBE_ACCURACY_SUFFIXES = ("_logreg", "_knn", "_linear")


def panel_of(name: str) -> Optional[str]:
    """The panel a scalar belongs to (None: not plotted). Decided from the name alone."""
    if name in IGNORED:
        return None
    if name.startswith("probe_"):
        accuracy = "acc" in name or name.endswith(PROBE_ACCURACY_SUFFIXES)
        return "probe accuracy" if accuracy else "probe diagnostics"
    if "loss" in name or name in ("utterance_term", "frame_term"):
        return "loss"
    if name in LR_NAMES:
        return "learning rate"
    if name in VALIDATION_METRICS:
        return "validation metrics"
    if name in ("target_var", "pred_var"):
        return "target / prediction variance"
    return None


PANEL_ORDER = ("loss", "learning rate", "validation metrics", "probe accuracy", "probe diagnostics",
               "target / prediction variance")


def last_update(run: RunScalars) -> int:
    """The highest update any scalar of the run was logged at."""
    return max((step for points in run.series.values() for step in points), default=0)


def drawn_series(run: RunScalars) -> Series:
    """The series as they are drawn, each point where a reader expects it:

    - learning rates: fairseq logs at update N the lr it has just set for update N + 1, so each point
      moves one update on, and the value logged at the last update (which no update trains with; the
      cosine schedule restarts its period there) is dropped;
    - loss: when the weighted ``utterance_term`` is logged, it replaces the unweighted
      ``utterance_loss``, and a logged ``frame_term`` (``model.frame_loss_weight`` other than 1)
      replaces ``frame_loss``, so the drawn parts add up to ``loss``;
    - online probe scores: they are logged again on every line until the next probe, so only the
      update at which each new value appears is kept (one point per probe); the log-mel baseline
      (``probe_logmel_*``, constant) is a line from the first probe to the end of the run.
    """
    end = last_update(run)
    drawn: Series = {}
    for (tag, name), points in run.series.items():
        if name in LR_NAMES:
            points = {step + 1: value for step, value in points.items() if step + 1 <= end}
        elif name == "utterance_loss" and (tag, "utterance_term") in run.series:
            continue
        elif name == "frame_loss" and (tag, "frame_term") in run.series:
            continue
        elif name.startswith("probe_logmel_") and points:
            # the baseline does not change: one line from the first probe to the end of the run
            first = min(points)
            points = {first: points[first], max(end, first): points[first]}
        elif name.startswith("probe_"):
            kept, previous = {}, None
            for step, value in sorted(points.items()):
                if value != previous:
                    kept[step] = value
                previous = value
            points = kept
        drawn[(tag, name)] = points
    return drawn


@dataclass
class BaselineCrossing:
    """When an online probe's accuracy first rose above the log-mel baseline of the same classifier.

    ``update`` is the first probe whose score is above ``baseline`` (None: never); a run that passes at
    ``first_probe`` passed at or before it, so the probe interval bounds what can be told. ``minutes`` is
    fairseq's wall clock at that update (from the start of training, the probes' own time included).
    ``value`` is the score at ``update``, else the best score of the run. Early scores can hover around
    the baseline, so ``settled`` (and ``settled_minutes``) is the first probe from which every later
    probe stayed above it (None: the last probe was not above)."""

    probe: str
    baseline: float
    first_probe: int
    update: Optional[int]
    minutes: Optional[float]
    value: float
    settled: Optional[int] = None
    settled_minutes: Optional[float] = None

    def describe(self) -> str:
        if self.update is None:
            return f"{self.probe} never above log-mel {self.baseline:.4f} (best {self.value:.4f})"
        when = f"update {self.update}" + (f", {self.minutes:.1f} min" if self.minutes is not None else "")
        first = " (the first probe: at or before it)" if self.update == self.first_probe else ""
        text = f"{self.probe} above log-mel {self.baseline:.4f} at {when}{first}: {self.value:.4f}"
        if self.settled is None:
            return text + "; not above at the last probe"
        if self.settled != self.update:
            minutes = f", {self.settled_minutes:.1f} min" if self.settled_minutes is not None else ""
            text += f"; above at every probe from update {self.settled}{minutes}"
        return text


def baseline_crossings(run: RunScalars) -> list[BaselineCrossing]:
    """For each online-probe accuracy ``probe_{model}_{classifier}`` whose baseline
    ``probe_logmel_{classifier}`` is logged, where it first passed that baseline (``train_inner`` lines,
    one point per probe as drawn)."""
    series = drawn_series(run)
    wall = run.series.get(("train_inner", "wall"), {})
    found = []
    for (tag, name), points in sorted(series.items()):
        if tag != "train_inner" or not name.startswith("probe_") or name.startswith("probe_logmel_") or not points:
            continue
        suffix = next((s for s in PROBE_ACCURACY_SUFFIXES if name.endswith(s)), None)
        baseline = series.get((tag, f"probe_logmel{suffix}")) if suffix else None
        if not baseline:
            continue
        level = baseline[min(baseline)]
        ordered = sorted(points.items())
        above = next(((step, value) for step, value in ordered if value > level), None)
        if above is None:
            found.append(BaselineCrossing(name, level, ordered[0][0], None, None, max(v for _, v in ordered)))
            continue
        settled = None
        for step, value in reversed(ordered):
            if value <= level:
                break
            settled = step
        found.append(BaselineCrossing(name, level, ordered[0][0], above[0], _minutes(wall, above[0]), above[1],
                                      settled, _minutes(wall, settled)))
    return found


def _minutes(wall: dict[int, float], step: Optional[int]) -> Optional[float]:
    return wall[step] / 60.0 if step is not None and step in wall else None


def panels(run: RunScalars) -> dict[str, list[tuple[str, str]]]:
    """Panel title -> the ``(tag, name)`` series drawn in it, in :data:`PANEL_ORDER`."""
    series = drawn_series(run)
    chosen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(series):
        tag, name = key
        if tag == "train" and ("train_inner", name) in series:
            continue  # the end-of-epoch average repeats the finer train_inner curve
        title = panel_of(name)
        if title is not None and series[key]:
            chosen[title].append(key)
    return {title: chosen[title] for title in PANEL_ORDER if chosen.get(title)}


def plot_run(path: str, out: str, title: Optional[str] = None) -> dict:
    """Draw the curves of ``path`` (run folder or log file) into the PNG ``out``.

    Returns ``{"out", "source", "panels": {title: [series labels]}, "points", "crossings"}`` (the last:
    :func:`baseline_crossings`). Raises
    ``FileNotFoundError``/``ValueError`` (see :func:`read_run`) and ``ImportError`` without matplotlib.
    """
    run = read_run(path)
    chosen = panels(run)
    if not chosen:
        raise ValueError(f"{path}: scalars found ({', '.join(run.names())}) but none to plot")
    import logging

    # fairseq/hydra may have set the root logger to DEBUG: keep matplotlib's font search out of the log
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(chosen)
    cols = 1 if count == 1 else 2
    rows = math.ceil(count / cols)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    series = drawn_series(run)
    end = last_update(run)
    labels: dict[str, list[str]] = {}
    points = 0
    for ax, (panel, keys) in zip(axes.flat, chosen.items()):
        labels[panel] = []
        for tag, name in keys:
            data = sorted(series[(tag, name)].items())
            steps, values = [s for s, _ in data], [v for _, v in data]
            label = f"{name} ({tag})"
            # markers wherever points are few: a short run's curve, validation, one point per probe
            style = "-" if tag == "train_inner" and len(data) > 20 and not name.startswith("probe_") else "o-"
            if name.startswith("probe_logmel_"):
                style = "--"  # the baseline a probe curve has to cross
            ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
            labels[panel].append(label)
            points += len(data)
        ax.set_title(panel)
        ax.set_xlabel("update")
        # every panel spans the whole run, so a run's few validation or probe points sit where they belong
        ax.set_xlim(0, max(end, 1) * 1.02 + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = [v for key in keys for v in series[key].values()]
        if panel == "loss":
            if min(drawn) > 0 and max(drawn) / min(drawn) > 10:
                ax.set_yscale("log")  # loss terms of very different sizes (the release's summed utterance term)
            if any(name == "utterance_term" for _, name in keys):
                frame = "frame_term" if any(name == "frame_term" for _, name in keys) else "frame_loss"
                ax.text(0.01, 0.02, f"loss = {frame} + utterance_term", transform=ax.transAxes, fontsize=7)
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.set_ylabel("lr used by the update", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.suptitle(title or os.path.abspath(path), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"out": out, "source": run.source, "panels": labels, "points": points,
            "crossings": baseline_crossings(run)}
