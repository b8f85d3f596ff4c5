"""Export a loaded EAT model to ONNX (what ``eat-export`` runs), optionally with int8 weights.

The graph is the encoder from normalised fbank windows to one block's token outputs (plus the head's
logits for a fine-tuned model); see :mod:`eat_fairseq.inference.onnx_backend` for why it starts and
ends there and what the metadata hold. Any model :func:`~eat_fairseq.inference.api.load_model` reads
can be exported, because export starts from the loaded handle.

**Exporter.** torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 18):
it needs only the ``onnx`` package, works offline, and gives dynamic batch and frame axes for this
encoder as it is (its attention is ``scaled_dot_product_attention``, exported as plain MatMul/Softmax
nodes), with outputs within ~1e-6 of PyTorch eager. The torch.export-based exporter would add
onnxscript to the dependencies for the same graph.

**int8.** onnxruntime's dynamic quantisation of the weight matrices (``MatMul`` nodes with a constant
input: the attention and MLP projections), int8 weights with one scale per output channel,
activations quantised on the fly. The attention products themselves, LayerNorm, softmax, the patch
convolution and the head stay fp32. Per-channel scales measured closer to fp32 than one scale per
matrix (lowest CLS cosine to fp32 0.99982 against 0.99966, EAT-base with random weights) at the same
speed.

**Accuracy check.** Every export runs the new file beside PyTorch eager on a few windows (given
audio, or generated test signals) and reports the largest fp32 difference; an int8 export also
reports the cosine of its embeddings to the fp32 ones per window and per time patch (and, for a
classifier, how often the top class agrees). The int8 numbers are stored in the file's metadata.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from eat_fairseq.inference.api import EATModelHandle
from eat_fairseq.inference.onnx_format import (
    FEATURES_NAME,
    INPUT_NAME,
    INSTALL_HINT,
    LOGITS_NAME,
    META_PREFIX,
    OnnxMetadata,
    OnnxUnavailableError,
    import_onnxruntime,
    make_session,
)

__all__ = ["DEFAULT_OPSET", "ExportReport", "ExportGraph", "check_waves", "export_onnx", "require_export_packages"]

DEFAULT_OPSET = 18
CHECK_CLIPS = 4


def _import_onnx() -> Any:
    """The ``onnx`` package (writing metadata, quantising), or :class:`OnnxUnavailableError`."""
    try:
        import onnx
    except ImportError as exc:
        raise OnnxUnavailableError(
            f"exporting to ONNX needs the onnx package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return onnx


def require_export_packages() -> None:
    """Raise :class:`OnnxUnavailableError` unless onnx and onnxruntime import (checked before a large
    checkpoint is read, so a missing package is said at once)."""
    _import_onnx()
    import_onnxruntime()


class ExportGraph(nn.Module):
    """What the ONNX graph computes: ``fbank (B, T, F)`` -> ``features (B, 1+P, D)`` of block ``layer``
    [, ``logits (B, C)``].

    Built from the handle's own modules, with the same calls as the handle's eager path
    (``extract_features``; the classifier's ``head(fc_norm(pool(.)))`` over the last block), so the
    exported graph and PyTorch eager compute the same thing.
    """

    def __init__(self, handle: EATModelHandle, layer: int) -> None:
        super().__init__()
        self.encoder = handle.encoder
        self.classifier = handle.classifier
        self.layer = layer

    @property
    def output_names(self) -> list[str]:
        return [FEATURES_NAME] if self.classifier is None else [FEATURES_NAME, LOGITS_NAME]

    def forward(self, fbank: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if self.classifier is None:
            return self.encoder.extract_features(fbank, layer=self.layer)
        states = self.encoder.hidden_states(fbank)
        clf = self.classifier
        logits = clf.head(clf.fc_norm(clf.pool(states[-1])))
        return states[self.layer], logits


@dataclass
class ExportReport:
    """What an export wrote and measured (``lines()`` is what ``eat-export`` prints)."""

    path: str
    kind: str
    layer: int
    depth: int
    int8: bool
    size_bytes: int
    seconds: float
    check_windows: int
    check_source: str
    fp32_max_abs: float
    fp32_relative: float
    int8_check: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path}: {self.kind}, block {self.layer} of {self.depth}, "
            f"{'int8' if self.int8 else 'fp32'}, {self.size_bytes / 1e6:.1f} MB, in {self.seconds:.1f} s",
            f"fp32 graph against PyTorch on {self.check_windows} windows ({self.check_source}): max |difference| "
            f"{self.fp32_max_abs:.2e} ({self.fp32_relative:.1e} of the largest output)",
        ]
        c = self.int8_check
        if c:
            line = (
                f"int8 against fp32 on the same windows: utterance (CLS) cosine per window min "
                f"{c['utterance_cosine_min']:.6f} mean {c['utterance_cosine_mean']:.6f}; frame cosine per time "
                f"patch min {c['frame_cosine_min']:.6f} mean {c['frame_cosine_mean']:.6f}"
            )
            if "top1_agreement" in c:
                line += (
                    f"; top-1 class agrees on {c['top1_agreement']:.0%}, max score difference {c['score_max_abs']:.4f}"
                )
            if c.get("fp32_blocks"):
                line += f" (the last {c['fp32_blocks']} block(s) kept in fp32)"
            out.append(line)
        return out


def check_waves(sample_rate: int, seconds: float, count: int = CHECK_CLIPS, seed: int = 0) -> list[Tensor]:
    """``count`` generated mono clips of ``seconds`` at ``sample_rate`` for the accuracy check.

    Different kinds of signal so the check does not rest on one spectrum: a harmonic tone with
    vibrato, a sweep, bursts of filtered noise, and clicks over a hum; each with a little noise.
    """
    rng = np.random.default_rng(seed)
    n = max(int(round(seconds * sample_rate)), 400)
    t = np.arange(n) / sample_rate
    nyquist = sample_rate / 2
    clips = []
    for k in range(count):
        kind = k % 4
        if kind == 0:
            f0 = rng.uniform(150, 400) * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            x = sum(np.sin(h * phase) / h for h in range(1, 8))
        elif kind == 1:
            f_end = min(7000.0, 0.9 * nyquist)
            x = np.sin(2 * np.pi * (50 * t + (f_end - 50) * t**2 / (2 * t[-1])))
        elif kind == 2:
            noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
            x = noise * (np.sin(2 * np.pi * 1.5 * t) > 0)
        else:
            x = 0.3 * np.sin(2 * np.pi * 60 * t)
            x[rng.integers(0, n, size=max(1, int(seconds * 8)))] += 1.0
        x = 0.3 * x / (np.abs(x).max() + 1e-9) + 0.01 * rng.standard_normal(n)
        clips.append(torch.from_numpy(x.astype(np.float32)))
    return clips


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what the exporter and the quantiser print for every export (the TorchScript exporter's
    deprecation notice and tracer warnings about shape arithmetic, the quantiser's advice to
    pre-process): they are expected for this graph and say nothing to the user."""
    root = logging.getLogger()
    quiet = logging.Filter("eat_fairseq.never")  # rejects every record of other loggers
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(quiet)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine over the last dimension (float64)."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-30)


def _run_session(session: Any, windows: Tensor, names: Sequence[str], batch: int) -> list[Tensor]:
    parts: list[list[Tensor]] = [[] for _ in names]
    for start in range(0, windows.shape[0], batch):
        feed = windows[start : start + batch].contiguous().numpy()
        for part, out in zip(parts, session.run(list(names), {INPUT_NAME: feed})):
            part.append(torch.from_numpy(out))
    return [torch.cat(p) for p in parts]


def _run_eager(graph: ExportGraph, windows: Tensor, batch: int) -> list[Tensor]:
    parts: list[list[Tensor]] = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            out = graph(windows[start : start + batch])
            out = [out] if isinstance(out, Tensor) else list(out)
            parts = parts or [[] for _ in out]
            for part, tensor in zip(parts, out):
                part.append(tensor.float())
    return [torch.cat(p) for p in parts]


def _int8_cost(fp32: list[Tensor], int8: list[Tensor], grid_w: int, multi_label: Optional[bool]) -> dict[str, Any]:
    """Cosine of int8 to fp32 embeddings per window (CLS) and per time patch (mean over frequency),
    and for a classifier the top-1 agreement and the largest score difference."""
    a, b = fp32[0], int8[0]
    n, _, d = a.shape
    utterance = _cosine(a[:, 0], b[:, 0])
    frame = _cosine(a[:, 1:].reshape(n, -1, grid_w, d).mean(2), b[:, 1:].reshape(n, -1, grid_w, d).mean(2))
    cost: dict[str, Any] = {
        "windows": n,
        "utterance_cosine_min": float(utterance.min()),
        "utterance_cosine_mean": float(utterance.mean()),
        "frame_cosine_min": float(frame.min()),
        "frame_cosine_mean": float(frame.mean()),
    }
    if len(fp32) > 1:
        score = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, dim=-1))
        sa, sb = score(fp32[1]), score(int8[1])
        cost["top1_agreement"] = float((sa.argmax(-1) == sb.argmax(-1)).double().mean())
        cost["score_max_abs"] = float((sa - sb).abs().max())
    return cost


def _write_metadata(onnx: Any, path: str, meta: OnnxMetadata) -> None:
    """Replace the file's ``eat.*`` metadata by ``meta`` (other keys, e.g. the quantiser's, stay)."""
    model = onnx.load(path)
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *meta.to_props().items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def _quantize(src: str, dst: str, keep_fp32: Sequence[int] = ()) -> None:
    """Dynamic int8 quantisation of the weight MatMuls, one scale per output channel (module docstring),
    except the MatMuls of the blocks in ``keep_fp32``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx = _import_onnx()
    keep = {int(b) for b in keep_fp32}
    excluded = [n.name for n in onnx.load(src, load_external_data=False).graph.node
                if n.op_type == "MatMul" and (m := re.search(r"blocks\.(\d+)/", n.name)) and int(m.group(1)) in keep]
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=excluded)


def export_onnx(
    handle: EATModelHandle,
    path: Union[str, "os.PathLike[str]"],
    layer: Optional[int] = None,
    int8: bool = False,
    check: Optional[Sequence[Tensor]] = None,
    opset: int = DEFAULT_OPSET,
    fp32_blocks: int = 0,
) -> ExportReport:
    """Write ``handle``'s encoder (and head) as an ONNX file at ``path`` and check it (module docstring).

    Args:
        handle: a model loaded on the CPU by :func:`~eat_fairseq.inference.api.load_model` (not an ``.onnx``).
        path: the file to write; replaced atomically (a failed export leaves no partial file).
        layer: the block whose tokens the file outputs (0-based, negative from the end; default the last).
        int8: quantise the weights to int8 (and measure what that costs against fp32).
        check: mono waveforms at the model's rate for the accuracy check (default: :func:`check_waves`).
        opset: ONNX opset of the graph.
        fp32_blocks: with ``int8``, keep the weights of the last ``fp32_blocks`` exported blocks in fp32
            (their error reaches the output unattenuated; on a trained ``eat_small`` the CLS cosine
            to fp32 rose from 0.9988 to 0.9996 with the last of 4 blocks kept).

    Raises :class:`~eat_fairseq.inference.onnx_backend.OnnxUnavailableError` without onnx /
    onnxruntime, ``ValueError`` for an unusable handle or layer.
    """
    from eat_fairseq.inference.onnx_backend import OnnxModelHandle

    require_export_packages()
    onnx = _import_onnx()
    if isinstance(handle, OnnxModelHandle):
        raise ValueError(f"{handle.source} is already an ONNX file; export from the checkpoint it came from")
    if handle.device.type != "cpu":
        raise ValueError(f"export from a model loaded on the CPU (this one is on {handle.device})")
    handle.check_layer(layer)
    depth = handle.num_layers
    block = (depth - 1 if layer is None else layer) % depth
    if not 0 <= fp32_blocks <= block + 1:
        raise ValueError(f"fp32_blocks must be in 0..{block + 1} (the exported blocks), got {fp32_blocks}")
    target = os.fspath(path)
    start = time.perf_counter()

    if check is None:
        check = check_waves(handle.sample_rate, handle.window_seconds)
        source = f"{len(check)} generated test clips"
    else:
        source = f"{len(check)} given clips"
    windows, _ = handle.windows(list(check))
    graph = ExportGraph(handle, block).eval()
    meta = OnnxMetadata(
        kind=handle.kind,
        layer=block,
        encoder=handle.encoder.cfg,
        features=handle.feature_cfg,
        labels=list(handle.labels) if handle.labels is not None else None,
        multi_label=handle.multi_label,
        pooling=getattr(handle.classifier, "pooling", None),
        int8=False,
        source=os.path.basename(handle.source),
    )
    names = graph.output_names
    axes = {INPUT_NAME: {0: "batch", 1: "frames"}, FEATURES_NAME: {0: "batch", 1: "tokens"}, LOGITS_NAME: {0: "batch"}}
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.join(folder, f".{os.path.basename(target)}.{os.getpid()}")
    fp32_path, int8_path = base + ".fp32.tmp", base + ".int8.tmp"
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                graph,
                (windows[:1],),
                fp32_path,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={k: v for k, v in axes.items() if k in (INPUT_NAME, *names)},
            )
        _write_metadata(onnx, fp32_path, meta)
        eager = _run_eager(graph, windows, handle.batch_size)
        fp32 = _run_session(make_session(fp32_path), windows, names, handle.batch_size)
        max_abs = max(float((a - b).abs().max()) for a, b in zip(fp32, eager))
        scale = max(float(e.abs().max()) for e in eager)
        cost: dict[str, Any] = {}
        if int8:
            with _quiet_export():
                _quantize(fp32_path, int8_path, keep_fp32=range(block + 1 - fp32_blocks, block + 1))
            quantized = _run_session(make_session(int8_path), windows, names, handle.batch_size)
            cost = _int8_cost(fp32, quantized, handle.num_freq_patches, handle.multi_label)
            cost["fp32_blocks"] = fp32_blocks
            meta.int8, meta.int8_check = True, cost
            _write_metadata(onnx, int8_path, meta)
            os.replace(int8_path, target)
        else:
            os.replace(fp32_path, target)
    finally:
        for leftover in (fp32_path, int8_path):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return ExportReport(
        path=target,
        kind=handle.kind,
        layer=block,
        depth=depth,
        int8=int8,
        size_bytes=os.path.getsize(target),
        seconds=time.perf_counter() - start,
        check_windows=int(windows.shape[0]),
        check_source=source,
        fp32_max_abs=max_abs,
        fp32_relative=max_abs / scale if scale > 0 else math.inf,
        int8_check=cost,
    )
