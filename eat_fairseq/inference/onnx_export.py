"""Export a loaded EAT model to ONNX (what ``eat-export`` runs), optionally with int8 weights.

The graph is the encoder from normalised fbank windows to one block's token outputs (plus the head's
logits for a fine-tuned model); see :mod:`eat_fairseq.inference.onnx_backend` for why it starts and
ends there and what the metadata hold. Any model :func:`~eat_fairseq.inference.api.load_model` reads
can be exported, because export starts from the loaded handle.

**Exporter.** torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 18):
it needs only the ``onnx`` package, works offline, and gives dynamic batch and frame axes for this
encoder as it is, with outputs within ~1e-6 of PyTorch eager. The torch.export-based exporter would
add onnxscript to the dependencies for the same graph.

**Attention.** By default each block's attention (after the ``qkv`` projection, before ``proj``) is
written as one onnxruntime ``com.microsoft.MultiHeadAttention`` node: its CPU kernel does the head
split, the two products and the softmax without the transposes and copies of the plain graph, which
measured 3-6% faster for the whole int8 encoder (EAT-base, one thread, 4 x 1,024 frames; fp32 within
2%) at the same accuracy. Files with that node run only on onnxruntime (tested with 1.32);
``portable=True`` (``eat-export --portable``) writes ``scaled_dot_product_attention`` as standard
MatMul / Softmax nodes instead, for other runtimes.

**int8.** onnxruntime's dynamic quantisation of the weight matrices (``MatMul`` nodes with a constant
input: the attention and MLP projections), int8 weights with one scale per output channel,
activations quantised on the fly. The attention products themselves, LayerNorm, softmax, the patch
convolution and the head stay fp32. Per-channel scales measured closer to fp32 than one scale per
matrix (lowest CLS cosine to fp32 0.99982 against 0.99966, EAT-base with random weights) at the same
speed.

**Which int8 weights.** onnxruntime's x86 int8 product multiplies uint8 activations by int8
weights. With VNNI (AVX512-VNNI or AVX-VNNI) it sums in 32 bits; without it (AVX2, early AVX-512)
pairs of products are summed in 16 bits first and large sums are clipped (saturate), which moves the
outputs: random EAT-base on an AVX2 EPYC, frame cosine to fp32 at least 0.99894 instead of 0.99982.
So ``int8_weights`` (``eat-export --int8-weights``) chooses how the weights are stored: ``s8``
(signed 8-bit, the fastest; exact with VNNI; ARM not measured), ``s7`` (signed 7-bit, onnxruntime's
``reduce_range``: no sum can clip, the same speed as ``s8``, twice its weight rounding step: 0.99929
there; 3% slower) or ``u8`` (unsigned 8-bit with a zero point per channel: onnxruntime widens the
operands to 16 bits and sums the products in 32, so nothing clips: 0.99982, encoder 20% slower than
``s8`` on that AVX2 CPU; 1.8 times as long as ``s8`` on a CPU with VNNI, at the same accuracy). The
default follows the exporting CPU (:func:`~eat_fairseq.inference.onnx_format.default_int8_weights`:
``u8`` on x86 without VNNI, else ``s8``), the choice is stored in the metadata, and loading an ``s8``
file on a CPU where it saturates warns.

**The CLS token in int8.** The utterance embedding (the CLS output) of a pre-trained EAT can vary
little from clip to clip around a large common vector (a trained ``eat_small``: norm 0.47, between-clip
standard deviation per dimension ~6e-3). Rounding the CLS row's activations to int8 steps then moves it
by about a sixth of that variation (per dimension, median), and the standardised CLS probe on FSDD
lost 5.0 points (28.5 -> 23.5, 100 clips per speaker, L2 strength chosen on every other speaker);
weights rounded to int8 with float activations cost 0.1. So by
default each block projects the CLS row apart from the patch rows (:func:`_cls_apart_forward`, the
same computation) and multiplies it by the *same* int8 weights in two int8 steps: the row rounded to
uint8, then what that rounding lost rounded again (:func:`_residual_int8_matmul`), which carries the
activations with ~16-bit precision (CLS output within cosine 0.9999996 of float activations on the
same weights, EAT-base). The file holds each weight matrix once and nothing is dequantised at load
(onnxruntime prepacks the extra products' int8 weights when it builds the session). Cost, one
thread: 0-3% of encoder speed, 0.2 s of start-up and ~90 MB of memory for EAT-base (EAT-large: 8%
in one run, 0.6 s). Float products of the dequantised weights, this module's earlier way, were as
accurate but cost 0.5 s of start-up and 350 MB for EAT-base, 1.7 s and 1.2 GB for EAT-large.
``int8_cls=True`` (``eat-export --int8-cls``) rounds the CLS row's activations once, like the rest.

**Accuracy check.** Every export runs the new file beside PyTorch eager on a few windows (given
audio, or generated test signals) and reports the largest fp32 difference; an int8 export also
reports the cosine of its embeddings to the fp32 ones per window and per time patch (and, for a
classifier, how often the top class agrees). The int8 numbers are stored in the file's metadata.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eat_fairseq.inference.api import EATModelHandle
from eat_fairseq.inference.onnx_format import (
    FEATURES_NAME,
    INPUT_NAME,
    INSTALL_HINT,
    INT8_WEIGHTS,
    LOGITS_NAME,
    META_PREFIX,
    OnnxMetadata,
    OnnxUnavailableError,
    default_int8_weights,
    import_onnxruntime,
    int8_saturates,
    make_session,
    run_windows,
    windows_per_run,
)
from eat_fairseq.model.encoder import Attention, Block

__all__ = ["DEFAULT_OPSET", "ExportReport", "ExportGraph", "check_waves", "export_onnx", "require_export_packages"]

DEFAULT_OPSET = 18
CHECK_CLIPS = 4
WEIGHTS_WORDS = {
    "s8": "signed 8-bit: fastest; its products can saturate on x86 CPUs without VNNI",
    "s7": "signed 7-bit: no saturation on any CPU, twice the rounding step of 8-bit",
    "u8": "unsigned 8-bit: no saturation on any CPU; slower on x86 without VNNI",
}


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


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, N, D)`` -> ``(B, h, N, D/h)``."""
    b, n, d = t.shape
    return t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)


def _attend_plain(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Attention of projected ``q (B, Nq, D)`` over ``k, v (B, Nk, D)`` -> ``(B, Nq, D)``, as
    :class:`~eat_fairseq.model.encoder.Attention` computes it."""
    b, n, d = q.shape
    out = F.scaled_dot_product_attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads))
    return out.transpose(1, 2).reshape(b, n, d)


class _MultiHeadAttention(torch.autograd.Function):
    """:func:`_attend_plain` (what the export traces), written to ONNX as one onnxruntime
    ``com.microsoft.MultiHeadAttention`` node (its default scale is ``1/sqrt(D/heads)``, as in
    ``scaled_dot_product_attention``)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
        return _attend_plain(q, k, v, num_heads)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, num_heads: int) -> Any:
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads)
        out.setType(q.type())
        return out


def _attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, fused: bool) -> Tensor:
    """Attention as one onnxruntime node in the export (``fused``) or as standard ops."""
    return _MultiHeadAttention.apply(q, k, v, num_heads) if fused else _attend_plain(q, k, v, num_heads)


def _fused_forward(self: Attention, x: Tensor) -> Tensor:
    """``Attention.forward`` for inference with the attention as one :class:`_MultiHeadAttention`: the
    fused ``qkv`` output ``(B, N, 3D)`` holds q, k, v side by side, as the module's reshape reads it."""
    q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)  # each (B, N, D)
    return self.proj(_attend(q, k, v, self.num_heads, fused=True))


CLS_PATH = "cls_path"  # name of the CLS token's weight copies in an int8 export (and in its node names)


def _cls_apart_forward(self: Block, x: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """``Block.forward`` (inference) with the CLS token's row through its own copies of the four
    weight matrices (``self.cls_path``, stored as ``(in, out)`` so each is one named initializer of the
    ONNX file), which the int8 export keeps out of the quantiser.

    The same computation: attention is per query row and LayerNorm per token, so the CLS row and the
    patch rows can be projected apart; only keys and values are joined. Why: dynamic quantisation
    rounds the CLS row's activations to int8 steps, and a CLS output that varies little from clip to
    clip loses what varies (module docstring).
    """
    attn, mlp, w = self.attn, self.mlp, getattr(self, CLS_PATH)
    d = x.shape[-1]
    c, p = x[:, :1], x[:, 1:]  # (B, 1, D), (B, P, D)
    qc, kc, vc = (torch.matmul(c, w["qkv"]) + attn.qkv.bias).split(d, dim=-1)
    qp, kp, vp = attn.qkv(p).split(d, dim=-1)
    k, v = torch.cat([kc, kp], dim=1), torch.cat([vc, vp], dim=1)  # (B, 1+P, D)
    c = self.norm1(c + torch.matmul(_attend(qc, k, v, attn.num_heads, fused), w["proj"]) + attn.proj.bias)
    p = self.norm1(p + attn.proj(_attend(qp, k, v, attn.num_heads, fused)))
    tc = torch.matmul(mlp.act(torch.matmul(c, w["fc1"]) + mlp.fc1.bias), w["fc2"]) + mlp.fc2.bias
    tp = mlp(p)
    return torch.cat([self.norm2(c + tc), self.norm2(p + tp)], dim=1), torch.cat([tc, tp], dim=1)


@contextlib.contextmanager
def _export_forwards(graph: "ExportGraph", fused: bool, cls_apart: Sequence[int] = ()) -> Iterator[None]:
    """For the export only: every :class:`Attention` through :func:`_fused_forward` (``fused``), and
    the blocks in ``cls_apart`` through :func:`_cls_apart_forward` with fresh weight copies. The
    modules' own ``forward`` and attributes are restored after, also when the export fails."""
    patched: list[tuple[nn.Module, Any]] = []  # (module, the instance forward it had, if any)
    blocks = list(graph.encoder.blocks)
    try:
        if fused:
            for attn in (m for m in graph.modules() if isinstance(m, Attention)):
                patched.append((attn, vars(attn).get("forward")))
                attn.forward = types.MethodType(_fused_forward, attn)  # type: ignore[method-assign]
        for i in cls_apart:
            block = blocks[i]
            patched.append((block, vars(block).get("forward")))
            linears = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
            setattr(block, CLS_PATH, nn.ParameterDict(
                {k: nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False) for k, m in linears.items()}
            ))
            block.forward = types.MethodType(  # type: ignore[method-assign]
                functools.partial(_cls_apart_forward, fused=fused), block
            )
        yield
    finally:
        for module, own in patched:
            if own is None:
                vars(module).pop("forward", None)
            else:
                module.forward = own  # type: ignore[method-assign]
            if isinstance(module, Block) and hasattr(module, CLS_PATH):
                delattr(module, CLS_PATH)


@dataclass
class ExportReport:
    """What an export wrote and measured (``lines()`` is what ``eat-export`` prints)."""

    path: str
    kind: str
    layer: int
    depth: int
    int8: bool
    portable: bool
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
            f"{'int8' if self.int8 else 'fp32'}, {'standard ONNX ops' if self.portable else 'for onnxruntime'}, "
            f"{self.size_bytes / 1e6:.1f} MB, in {self.seconds:.1f} s",
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
            if c.get("int8_cls") is False and c.get("fp32_blocks", 0) < self.layer + 1:
                line += " (the CLS token's activations rounded in two steps)"
            out.append(line)
            if "weights" in c:
                out.append(f"int8 weights: {c['weights']} ({WEIGHTS_WORDS[c['weights']]})"
                           + ("; checked on a CPU without VNNI" if c.get("saturating_cpu") else ""))
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


def _run_session(session: Any, windows: Tensor, names: Sequence[str], num_heads: int, int8: bool) -> list[Tensor]:
    """The file's outputs as its users get them: windows run as :func:`windows_per_run` says for this
    machine's threads (an int8 file's check can differ a little between machines that run more
    windows per run than one)."""
    per_run = windows_per_run(session, num_heads, int8)
    outs = run_windows(session, list(names), windows.contiguous().numpy(), per_run)
    return [torch.from_numpy(out) for out in outs]


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


PROTO_LIMIT = 1_800_000_000  # bytes of weights above which a file keeps them beside it (protobuf's 2 GB cap)


def _weight_bytes(model: Any) -> int:
    """Bytes of a model's initializers (what decides whether it fits one protobuf)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def _save(onnx: Any, model: Any, path: str) -> None:
    """Save ``model`` at ``path``: one file, or with the weights in ``path + '.data'`` beside it when they
    pass protobuf's 2 GB cap (only the float intermediate of an int8 EAT-large export, which holds the
    CLS row's weight copies; every file eat-export delivers is one file)."""
    data = path + ".data"
    if os.path.exists(data):  # a former version of this file kept its weights beside it; onnx appends
        os.unlink(data)
    if _weight_bytes(model) > PROTO_LIMIT:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(data))
    else:
        onnx.save(model, path)


def _deliver(path: str, target: str) -> None:
    """Move the finished file to ``target``; refuse one whose weights live beside it (over 2 GB)."""
    if os.path.exists(path + ".data"):
        raise RuntimeError(f"the exported model holds over {PROTO_LIMIT / 1e9:.1f} GB of weights, more than one "
                           "ONNX file can")
    os.replace(path, target)


def _write_metadata(onnx: Any, path: str, meta: OnnxMetadata) -> None:
    """Replace the file's ``eat.*`` metadata by ``meta`` (other keys, e.g. the quantiser's, stay)."""
    model = onnx.load(path)
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *meta.to_props().items()]:
        model.metadata_props.add(key=key, value=value)
    _save(onnx, model, path)


def _bypass_identities(model: Any) -> bool:
    """Point the inputs that read an ``Identity`` of an initializer at the initializer itself (the
    exporter writes shared weights, e.g. of two identical blocks, that way, and the quantiser only
    quantises a MatMul whose weight is an initializer). Returns whether anything changed."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return False
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return True


def _digest(onnx: Any, tensor: Any) -> str:
    """Hash of a weight's dtype, shape and values (not its name)."""
    array = onnx.numpy_helper.to_array(tensor)
    return hashlib.sha1(repr((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()


def _quantize(src: str, dst: str, keep_fp32: Sequence[int] = (), weights: str = "s8") -> None:
    """Dynamic int8 quantisation of the weight MatMuls, one scale per output channel (module docstring),
    except the MatMuls of the blocks in ``keep_fp32`` and those of the CLS token's rows; ``weights``
    is one of :data:`~eat_fairseq.inference.onnx_format.INT8_WEIGHTS`.

    The CLS rows' MatMuls (:func:`_cls_apart_forward`; their weights are the initializers named
    ``...cls_path...``) become :func:`_residual_int8_matmul` products of the patch rows' int8 weights
    (the same initializers; the patch MatMul is the one whose weight holds the same values), so the
    file holds each weight matrix once, in int8, and the CLS row's activations keep ~16-bit precision.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weights not in INT8_WEIGHTS:
        raise ValueError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, got {weights!r}")
    onnx = _import_onnx()
    keep = {int(b) for b in keep_fp32}
    source = onnx.load(src)
    if _bypass_identities(source):
        _save(onnx, source, src)
        source = onnx.load(src)  # saved with its weights beside it (EAT-large), ``source`` no longer holds them
    big = _weight_bytes(source) > PROTO_LIMIT
    graph = source.graph
    inits = {i.name: i for i in graph.initializer}
    weight = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    cls_nodes = {name for name, w in weight.items() if CLS_PATH in w}
    excluded = [name for name in weight
                if name in cls_nodes or ((m := re.search(r"blocks\.(\d+)/", name)) and int(m.group(1)) in keep)]
    digest = {w: _digest(onnx, inits[w]) for w in weight.values()} if cls_nodes else {}
    patch_weight = {digest[w]: w for name, w in weight.items() if name not in cls_nodes and w in digest}
    cls_sibling = {weight[name]: patch_weight.get(digest[weight[name]]) for name in cls_nodes}
    del source, graph, inits  # the quantiser loads its own copy (GBs for EAT-large)
    quantize_dynamic(src, dst, weight_type=QuantType.QUInt8 if weights == "u8" else QuantType.QInt8,
                     per_channel=True, reduce_range=weights == "s7", op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=excluded, use_external_data_format=big)
    if not cls_nodes:
        return
    model = onnx.load(dst)
    present = {i.name for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name not in cls_nodes:
            nodes.append(node)
            continue
        sibling = cls_sibling[node.input[1]]
        if sibling is None or sibling + "_quantized" not in present:
            raise RuntimeError(f"int8 export: no quantised weights to share with {node.name}")
        nodes.extend(_residual_int8_matmul(
            onnx, node, sibling + "_quantized", sibling + "_scale", sibling + "_zero_point"))
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    left = [i.name for i in kept if CLS_PATH in i.name]
    if left:
        raise RuntimeError(f"int8 export: float copies of the CLS row's weights left in the file: {left[:3]}")
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(kept)
    model.graph.node.extend(nodes)
    _save(onnx, model, dst)


def _residual_int8_matmul(onnx: Any, node: Any, weight: str, scale: str, zero_point: str) -> list[Any]:
    """Nodes computing float ``node`` (``x @ W``) as two int8 products of the quantised ``W``: ``x`` is
    rounded to uint8 (``q1``, one scale for the tensor, as for the patch rows), what that rounding lost
    is rounded again (``q2``), and ``y = s1 W (q1 - z1) + s2 W (q2 - z2)``.

    The second step's scale is about 1/255 of the first's, so ``x`` reaches the weights with ~16-bit
    precision: on EAT-base the CLS output lies within cosine 0.9999996 of float activations on the
    same int8 weights. Standard ONNX ops (``DynamicQuantizeLinear``, ``MatMulInteger``); onnxruntime
    fuses them into its int8 products (the second step into ``DynamicQuantizeMatMul``, the first into
    ``MatMulIntegerToFloat`` beside its own ``DynamicQuantizeLinear``, whose output the residual
    reads too). The weights are the patch rows' initializers, so the file holds them once and nothing
    is dequantised at load.
    """
    make = onnx.helper.make_node
    x, y, p = node.input[0], node.output[0], node.name
    out = [
        make("DynamicQuantizeLinear", [x], [f"{p}_q1", f"{p}_s1", f"{p}_z1"], name=f"{p}_quantize1"),
        make("DequantizeLinear", [f"{p}_q1", f"{p}_s1", f"{p}_z1"], [f"{p}_x1"], name=f"{p}_dequantize1"),
        make("Sub", [x, f"{p}_x1"], [f"{p}_residual"], name=f"{p}_residual"),
        make("DynamicQuantizeLinear", [f"{p}_residual"], [f"{p}_q2", f"{p}_s2", f"{p}_z2"], name=f"{p}_quantize2"),
    ]
    for k in ("1", "2"):
        out += [
            make("MatMulInteger", [f"{p}_q{k}", weight, f"{p}_z{k}", zero_point], [f"{p}_acc{k}"],
                 name=f"{p}_matmul{k}"),
            make("Cast", [f"{p}_acc{k}"], [f"{p}_float{k}"], to=onnx.TensorProto.FLOAT, name=f"{p}_cast{k}"),
            make("Mul", [f"{p}_s{k}", scale], [f"{p}_scale{k}"], name=f"{p}_scale{k}"),
            make("Mul", [f"{p}_float{k}", f"{p}_scale{k}"], [f"{p}_y{k}"], name=f"{p}_rescale{k}"),
        ]
    out.append(make("Add", [f"{p}_y1", f"{p}_y2"], [y], name=f"{p}_sum"))
    return out


def export_onnx(
    handle: EATModelHandle,
    path: Union[str, "os.PathLike[str]"],
    layer: Optional[int] = None,
    int8: bool = False,
    check: Optional[Sequence[Tensor]] = None,
    opset: int = DEFAULT_OPSET,
    fp32_blocks: int = 0,
    portable: bool = False,
    int8_cls: bool = False,
    int8_weights: Optional[str] = None,
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
        portable: write the attention as standard ONNX ops (other runtimes) instead of onnxruntime's
            fused ``MultiHeadAttention`` (module docstring).
        int8_cls: with ``int8``, round the CLS row's activations once, like the patches' (faster; the
            utterance embedding moves further from fp32, module docstring).
        int8_weights: with ``int8``, how the weights are stored (module docstring, "Which int8
            weights"): ``s8``, ``s7`` or ``u8``; default :func:`~eat_fairseq.inference.onnx_format.default_int8_weights`
            (``u8`` on x86 CPUs without VNNI, else ``s8``).

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
    if int8_cls and not int8:
        raise ValueError("int8_cls goes with int8")
    if int8_weights is not None and not int8:
        raise ValueError("int8_weights goes with int8")
    if int8_weights is not None and int8_weights not in INT8_WEIGHTS:
        raise ValueError(f"int8_weights must be one of {', '.join(INT8_WEIGHTS)}, got {int8_weights!r}")
    weights = int8_weights or default_int8_weights()
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
        portable=portable,
    )
    names = graph.output_names
    axes = {INPUT_NAME: {0: "batch", 1: "frames"}, FEATURES_NAME: {0: "batch", 1: "tokens"}, LOGITS_NAME: {0: "batch"}}
    folder = os.path.dirname(os.path.abspath(target))
    # a private folder beside the target (same file system, so the final move is atomic): the float
    # intermediate of a large int8 export keeps its weights in files beside it
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=folder)
    fp32_path, int8_path = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
    try:
        kept = range(block + 1 - fp32_blocks, block + 1)
        ran = depth if handle.classifier is not None else block + 1  # a classifier's head reads the last block
        cls_apart = [i for i in range(ran) if i not in kept] if int8 and not int8_cls else []
        with _quiet_export(), torch.no_grad(), _export_forwards(graph, fused=not portable, cls_apart=cls_apart):
            torch.onnx.export(
                graph,
                (windows[:1],),
                fp32_path,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={k: v for k, v in axes.items() if k in (INPUT_NAME, *names)},
                custom_opsets=None if portable else {"com.microsoft": 1},
            )
        _write_metadata(onnx, fp32_path, meta)
        eager = _run_eager(graph, windows, handle.batch_size)
        fp32 = _run_session(make_session(fp32_path), windows, names, handle.encoder.cfg.num_heads, False)
        max_abs = max(float((a - b).abs().max()) for a, b in zip(fp32, eager))
        scale = max(float(e.abs().max()) for e in eager)
        cost: dict[str, Any] = {}
        if int8:
            with _quiet_export():
                _quantize(fp32_path, int8_path, keep_fp32=kept, weights=weights)
            quantized = _run_session(make_session(int8_path), windows, names, handle.encoder.cfg.num_heads, True)
            cost = _int8_cost(fp32, quantized, handle.num_freq_patches, handle.multi_label)
            cost["fp32_blocks"] = fp32_blocks
            cost["int8_cls"] = int8_cls
            cost["weights"] = weights
            cost["saturating_cpu"] = int8_saturates()
            meta.int8, meta.int8_check = True, cost
            _write_metadata(onnx, int8_path, meta)
            _deliver(int8_path, target)
        else:
            _deliver(fp32_path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportReport(
        path=target,
        kind=handle.kind,
        layer=block,
        depth=depth,
        int8=int8,
        portable=portable,
        size_bytes=os.path.getsize(target),
        seconds=time.perf_counter() - start,
        check_windows=int(windows.shape[0]),
        check_source=source,
        fp32_max_abs=max_abs,
        fp32_relative=max_abs / scale if scale > 0 else math.inf,
        int8_check=cost,
    )
