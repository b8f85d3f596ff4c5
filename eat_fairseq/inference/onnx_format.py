"""The ``.onnx`` format of ``eat-export`` and its onnxruntime session, without torch.

Shared by the torch handle (:mod:`eat_fairseq.inference.onnx_backend`) and the torch-free runner
(:mod:`eat_fairseq.inference.onnx_runner`): the graph's input and output names, the ``eat.*``
metadata (:class:`OnnxMetadata`), the session options, and the checks that a file is eat-export's
(:func:`open_onnx`). Nothing here imports torch or, at module level, onnxruntime.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from eat_fairseq.checkpoints.errors import ModelLoadError
from eat_fairseq.data.feature_settings import FeatureConfig
from eat_fairseq.model.config import EncoderConfig

__all__ = [
    "FORMAT_VERSION",
    "INPUT_NAME",
    "FEATURES_NAME",
    "LOGITS_NAME",
    "INSTALL_HINT",
    "OnnxMetadata",
    "OnnxUnavailableError",
    "check_exported_layer",
    "INT8_WEIGHTS",
    "default_int8_weights",
    "default_threads",
    "import_onnxruntime",
    "physical_cores",
    "run_windows",
    "windows_per_run",
    "int8_saturates",
    "is_onnx_path",
    "make_session",
    "open_onnx",
]

FORMAT_VERSION = 1
"""Version of the ``eat.*`` metadata layout; a file with a newer one is refused, not misread."""
META_PREFIX = "eat."
INPUT_NAME = "fbank"
FEATURES_NAME = "features"
LOGITS_NAME = "logits"
INSTALL_HINT = "pip install 'eat_fairseq[onnx]' (or: pip install onnxruntime)"
KINDS = ("pretrained", "classifier", "encoder")
INT8_WEIGHTS = ("s8", "s7", "u8")
"""How ``eat-export --int8`` stores the weights: ``s8`` signed 8-bit, ``s7`` signed 7-bit (onnxruntime's
``reduce_range``), ``u8`` unsigned 8-bit with a zero point per output channel (see :func:`int8_saturates`)."""
X86 = ("x86_64", "amd64", "i386", "i686", "x86")
LEFT_OUT_FUSIONS = ("SkipLayerNormFusion",)
"""onnxruntime graph fusions :func:`make_session` leaves out (its ``disabled_optimizers``): see there."""


class OnnxUnavailableError(ModelLoadError):
    """onnxruntime (or onnx, for exporting) is not installed; the message says what to install."""


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or :class:`OnnxUnavailableError` with the install command."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxUnavailableError(
            f"running .onnx models needs onnxruntime, which is not installed: {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def is_onnx_path(path: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix: ONNX files have no magic number)."""
    return os.fspath(path).lower().endswith(".onnx")


@dataclass
class OnnxMetadata:
    """What ``eat-export`` records in the file so that it can be used without the checkpoint.

    ``layer`` is the 0-based block whose output ``features`` holds; ``int8_check`` the accuracy of
    the int8 weights against fp32 measured at export (empty for fp32 files; its ``weights`` is one of
    :data:`INT8_WEIGHTS`, absent, meaning ``s8``, in files written before it was recorded, and
    ``saturating_cpu`` whether the check ran on a CPU where ``s8`` products saturate); ``portable`` whether the
    graph uses standard ONNX ops only (``eat-export --portable``; ``None`` for files written before
    it was recorded), so a user can tell whether the file runs outside onnxruntime.
    """

    kind: str
    layer: int
    encoder: EncoderConfig
    features: FeatureConfig
    labels: list[str] | None = None
    multi_label: bool | None = None
    pooling: str | None = None
    int8: bool = False
    source: str = ""
    int8_check: dict[str, Any] = field(default_factory=dict)
    portable: bool | None = None

    def to_props(self) -> dict[str, str]:
        """The ``eat.*`` string pairs stored in the model's ``metadata_props``."""
        props = {
            "format": str(FORMAT_VERSION),
            "kind": self.kind,
            "layer": str(self.layer),
            "encoder": json.dumps(dataclasses.asdict(self.encoder), sort_keys=True),
            "features": json.dumps(dataclasses.asdict(self.features), sort_keys=True),
            "int8": json.dumps(self.int8),
            "source": self.source,
        }
        if self.labels is not None:
            props["labels"] = json.dumps(self.labels, ensure_ascii=False)
            props["multi_label"] = json.dumps(bool(self.multi_label))
            props["pooling"] = str(self.pooling or "cls")
        if self.int8_check:
            props["int8_check"] = json.dumps(self.int8_check, sort_keys=True)
        if self.portable is not None:
            props["portable"] = json.dumps(bool(self.portable))
        return {META_PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], path: str) -> "OnnxMetadata":
        """Parse the ``eat.*`` pairs; a :class:`ModelLoadError` naming ``path`` when they are missing or bad."""
        own = {k[len(META_PREFIX) :]: v for k, v in props.items() if k.startswith(META_PREFIX)}
        if "format" not in own:
            raise ModelLoadError(f"{path}: an ONNX file without EAT metadata; write it with eat-export")
        try:
            version = int(own["format"])
            if version > FORMAT_VERSION:
                raise ModelLoadError(
                    f"{path}: written by a newer eat-export (metadata format {version}, this version reads "
                    f"{FORMAT_VERSION}); upgrade eat_fairseq"
                )
            kind = own["kind"]
            if kind not in KINDS:
                raise ValueError(f"unknown model kind {kind!r}")
            enc = EncoderConfig(**json.loads(own["encoder"]))
            feat = FeatureConfig(**json.loads(own["features"]))
            labels = json.loads(own["labels"]) if "labels" in own else None
            if kind == "classifier" and not labels:
                raise ValueError("a classifier without labels")
            meta = cls(
                kind=kind,
                layer=int(own["layer"]),
                encoder=enc,
                features=feat,
                labels=[str(label) for label in labels] if labels is not None else None,
                multi_label=bool(json.loads(own["multi_label"])) if labels is not None else None,
                pooling=own.get("pooling"),
                int8=bool(json.loads(own.get("int8", "false"))),
                source=own.get("source", ""),
                int8_check=json.loads(own["int8_check"]) if "int8_check" in own else {},
                portable=bool(json.loads(own["portable"])) if "portable" in own else None,
            )
        except ModelLoadError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: unusable EAT metadata ({type(exc).__name__}: {exc})") from exc
        if not 0 <= meta.layer < enc.depth:
            raise ModelLoadError(f"{path}: metadata names block {meta.layer} of a {enc.depth}-block encoder")
        return meta


@functools.lru_cache(maxsize=None)
def int8_saturates() -> bool:
    """Whether onnxruntime's int8 products with signed 8-bit weights can saturate on this CPU.

    On x86 without VNNI (AVX2, or AVX-512 before Cascade Lake / Zen 4) onnxruntime multiplies uint8
    activations by int8 weights with ``vpmaddubsw``, which adds two products into 16 bits and clips
    sums beyond 32,767 (255 x 127 x 2 = 64,770). Measured on an AVX2 EPYC with random EAT-base
    weights, one thread: frame cosine to fp32 at least 0.99894 with ``s8`` weights, 0.99929 with ``s7``
    (weights in [-64, 64]: no pair can pass 32,767; twice the weight rounding step) at about the same
    speed (3% slower), 0.99982 with ``u8`` (operands widened to 16 bits, products summed in 32 bits:
    no integer sum is clipped; encoder 20% slower). With VNNI (``vpdpbusd`` sums into 32 bits) nothing
    saturates; x86 without AVX2 is taken as not saturating (onnxruntime's SSE kernel on Linux sums in
    32 bits), and so are other architectures (ARM; not measured here). Read from ``/proc/cpuinfo`` on
    Linux, else from numpy's CPU features (which know AVX512-VNNI but not AVX-VNNI).
    onnxruntime's own remedy, the session option ``session.x64quantprecision=1`` (U8S8 products
    turned into U8U8 at load), fails on eat-export's default int8 files: their CLS-row products share
    the patch rows' weights and the conversion stops with "Attempt to replace the existing tensor"
    (onnxruntime 1.32), so the weights' form is chosen at export instead.
    """
    if platform.machine().lower() not in X86:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            saturates = cpuinfo_saturates(handle.read())
    except OSError:
        saturates = None
    if saturates is None:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as features
        except ImportError:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        saturates = bool(features.get("AVX2", False)) and not features.get("AVX512VNNI", False)
    return saturates


def cpuinfo_flags(text: str) -> set[str] | None:
    """The CPU flags of a Linux ``/proc/cpuinfo``'s first ``flags`` line; ``None`` without one."""
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def cpuinfo_saturates(text: str) -> bool | None:
    """From a Linux ``/proc/cpuinfo``'s first ``flags`` line: AVX2 without AVX512-VNNI or AVX-VNNI
    (:func:`int8_saturates`); ``None`` without such a line."""
    flags = cpuinfo_flags(text)
    if flags is None:
        return None
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


def default_int8_weights() -> str:
    """``eat-export --int8``'s weights when none are asked for: ``u8`` where signed 8-bit products can
    saturate on the exporting CPU (:func:`int8_saturates`), else ``s8`` (the fastest)."""
    return "u8" if int8_saturates() else "s8"


def make_session(path: str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads (default:
    :func:`default_threads`).

    One thread pool, run sequentially, all graph optimisations on; warnings of the runtime are not
    printed (it warns about unused initialisers of quantised graphs, which is noise to a user).
    ``session.disable_quant_qdq`` lets onnxruntime fold the ``DequantizeLinear`` of constant weights
    once at load instead of on every run; files written by eat-export before its residual int8 CLS
    products (see ``onnx_export``) computed their CLS row from dequantised weights and run 12% faster
    with it (1.85 -> 1.63 s per 4 x 1,024 frames, EAT-base, one thread). Current files have no such
    node, so it changes nothing for them.

    The fusion of each residual ``Add`` with the ``LayerNormalization`` after it into onnxruntime's
    ``SkipLayerNormalization`` is left out (:data:`LEFT_OUT_FUSIONS`): that kernel took 95 ms of an
    int8 EAT-base run of 4 x 1,024 frames on one thread (onnxruntime 1.32, AVX-512 EPYC), the
    ``Add`` and ``LayerNormalization`` it replaces 14 ms, so the int8 encoder ran 4-6% faster
    without it on one thread (0-9% on two, by windows per run), with the same accuracy (CLS cosine to
    fp32 0.999883 against 0.999884); fp32 files are not fused that way, so they do not change.
    Measured on one CPU only (a 2-core AVX-512 VNNI EPYC).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or default_threads())  # 0: onnxruntime's default
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(LEFT_OUT_FUSIONS)
        )
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"{path}: onnxruntime cannot load it: {text}") from exc


def physical_cores() -> int:
    """CPU cores this process may run on, hyperthreads counted once (what onnxruntime's default
    thread count follows); from Linux's CPU topology, else the logical CPU count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", encoding="ascii") as handle:
                cores.add(handle.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def windows_per_run(session: Any, num_heads: int, int8: bool) -> int:
    """How many windows one ``session.run`` takes: an int8 file one per ``num_heads`` intra-op
    threads, ``ceil(threads / num_heads)`` (one window on up to ``num_heads`` threads), an fp32 file
    twice that.

    Why not the caller's batch (measured with onnxruntime 1.32 on a 2-core AVX-512 VNNI EPYC only,
    1,024-frame windows): onnxruntime ran the encoder faster in small runs, probably because a
    window's activations then stay in the CPU's caches between operators. EAT-base int8, 8 windows:
    one window per run 2.99 s, two 2.98, four 3.14, eight 3.28 on one thread, 1.55 / 1.59 / 1.71 /
    1.66 s on two; EAT-large int8 9.56 / 9.67 / 10.03 / 10.59 s. fp32 gained less and lost with one
    window on EAT-large (31.85 / 29.58 / 29.80 / 31.36 s; EAT-base 7.86 / 7.88 / 8.15 / 8.60 s, two
    threads 4.31 / 4.11 / 4.09 / 4.19 s), hence two. torch eager was fastest with four (8.31 s against
    8.62 s with one), so the ``.pt`` path keeps the batch. The attention kernel shares its work out by
    (window, head), hence more windows on machines with more threads than heads (not measured).
    And for int8 a second reason: its activations are quantised with one scale per run, so a window's
    int8 output depends on the windows run with it; with one window per run (up to ``num_heads``
    threads) a clip's int8 embedding is the same whatever batch it comes in. Threads 0 (onnxruntime's
    default) count as :func:`physical_cores`.
    """
    threads = int(session.get_session_options().intra_op_num_threads) or physical_cores()
    return max(1, -(-threads // max(1, int(num_heads)))) * (1 if int8 else 2)


def run_windows(session: Any, names: list[str], windows: Any, per_run: int) -> list[Any]:
    """Outputs ``names`` of ``session`` for normalised windows ``(N, T, F)`` (a float32 numpy array),
    ``per_run`` windows per ``session.run`` (:func:`windows_per_run`), joined along the first axis."""
    if windows.shape[0] == 0:
        raise ValueError("no windows to run")
    parts: list[list[Any]] = [[] for _ in names]
    for start in range(0, windows.shape[0], per_run):
        feed = np.ascontiguousarray(windows[start : start + per_run], dtype=np.float32)
        for part, out in zip(parts, session.run(list(names), {INPUT_NAME: feed})):
            part.append(out)
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def default_threads() -> int:
    """Intra-op threads when none are given: torch's count when torch is already loaded (so one
    setting governs the fbank and the encoder), else ``$OMP_NUM_THREADS``, else 0, which lets
    onnxruntime choose (one per physical core, as torch's default)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return 0


def open_onnx(path: Union[str, "os.PathLike[str]"], threads: int | None = None) -> tuple[Any, OnnxMetadata]:
    """``(session, metadata)`` of an eat-export file, checked: :class:`OnnxUnavailableError` without
    onnxruntime, :class:`ModelLoadError` naming the file when it is missing, not ONNX, or not
    written by eat-export."""
    name = os.fspath(path)
    import_onnxruntime()
    if not os.path.exists(name):
        raise ModelLoadError(f"{name}: no such file")
    if not os.path.isfile(name):
        raise ModelLoadError(f"{name}: not a regular file")
    session = make_session(name, threads)
    meta = OnnxMetadata.from_props(session.get_modelmeta().custom_metadata_map, name)
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    wanted = {FEATURES_NAME} | ({LOGITS_NAME} if meta.kind == "classifier" else set())
    if inputs != [INPUT_NAME] or not wanted <= outputs:
        raise ModelLoadError(f"{name}: the graph's inputs {inputs} / outputs {sorted(outputs)} are not eat-export's")
    check = meta.int8_check if isinstance(meta.int8_check, dict) else {}
    int8_blocks = check.get("fp32_blocks", 0) < meta.layer + 1  # 0 when every exported block stayed fp32
    if meta.int8 and int8_blocks and check.get("weights", "s8") == "s8" and int8_saturates():
        warnings.warn(
            f"{name} has signed 8-bit int8 weights, whose products can saturate on this CPU (x86 without VNNI), "
            "which moves its outputs further from fp32 (random EAT-base: frame cosine 0.9989 instead of 0.9998). "
            "Export it again with eat-export --int8 --int8-weights u8 (no saturation, 20% slower here; the "
            "default on such a CPU) or s7 (about as fast as s8, nearer to fp32)",
            stacklevel=2,
        )
    return session, meta


def check_exported_layer(layer: int | None, depth: int, exported: int) -> None:
    """``ValueError`` unless ``layer`` (None: the exported one; negative from the end) is the block
    ``exported`` of a ``depth``-block encoder, the one block an eat-export file holds."""
    if layer is None:
        return
    if not -depth <= layer < depth:
        raise ValueError(f"layer must be in [-{depth}, {depth - 1}], got {layer}")
    if layer % depth != exported:
        raise ValueError(
            f"this .onnx file holds block {exported} only, not {layer}; export another with eat-export --layer {layer}"
        )
