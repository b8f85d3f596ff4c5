"""Run ``.onnx`` files written by ``eat-export`` with onnxruntime, behind the same handle as a ``.pt``.

Most users of an EAT model embed or tag a corpus on CPU servers and laptops, where onnxruntime runs
the encoder with int8 weights 2.5-3.1x as fast as PyTorch eager on CPUs with VNNI (fp32 about as
fast: both are bound by fp32 matrix products; ``benchmarks/extract_throughput.py``). So the ONNX file
is one more checkpoint format:
:func:`eat_fairseq.inference.api.load_model` (and with it ``eat-extract``, ``eat-tag``, the HEAR module
and ``eat-probe``) returns an :class:`OnnxModelHandle` for it, an
:class:`~eat_fairseq.inference.api.EATModelHandle` whose encoder (and head) are onnxruntime sessions.

**What the graph holds.** It starts at the normalised fbank windows ``fbank (batch, frames, mel)``
(dynamic batch and frames) and ends at the token outputs ``features (batch, 1 + P, D)`` of one block
(CLS first), plus ``logits (batch, C)`` for a fine-tuned model. Everything before (audio decoding,
resampling, fbank, windowing: :mod:`eat_fairseq.data.features`) and after (pooling into utterance /
frame / patch embeddings, window weighting, scores) is the handle's own code, shared with the
``.pt`` path, so there is one feature path and one pooling path whatever runs the encoder. The
exception is ``eat-extract`` / ``eat-tag`` on the CPU: they run an ``.onnx`` with the torch-free
:class:`~eat_fairseq.inference.onnx_runner.OnnxRunner` (the same steps in numpy, tested equal), so
that a run does not pay torch's import time.

**Metadata** (``eat.*`` keys of the model's ``metadata_props``, read here through onnxruntime): the
model kind, the exported block, the encoder configuration, the feature settings (sample rate,
window length, normalisation), labels and score type of a classifier, and whether the weights are
int8 (with the accuracy measured at export). The file alone is enough to embed or tag.

**Threads.** The session uses as many intra-op threads as torch (``--threads``, ``OMP_NUM_THREADS``
or torch's default), so one setting governs the fbank and the encoder.

onnxruntime is an optional dependency (``pip install 'eat_fairseq[onnx]'``); without it loading an
``.onnx`` raises :class:`OnnxUnavailableError`, a :class:`~eat_fairseq.inference.api.ModelLoadError`
whose one-line message says what to install. Nothing here imports onnxruntime at module level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Union

import torch
from torch import Tensor, nn

from eat_fairseq.inference.api import EATModelHandle, ModelLoadError
from eat_fairseq.inference.onnx_format import (
    FEATURES_NAME,
    FORMAT_VERSION,
    INPUT_NAME,
    INSTALL_HINT,
    LOGITS_NAME,
    OnnxMetadata,
    OnnxUnavailableError,
    check_exported_layer,
    import_onnxruntime,
    is_onnx_path,
    make_session,
    open_onnx,
    run_windows,
    windows_per_run,
)

__all__ = [
    "FORMAT_VERSION",
    "INPUT_NAME",
    "INSTALL_HINT",
    "OnnxMetadata",
    "OnnxUnavailableError",
    "OnnxEncoder",
    "OnnxClassifier",
    "OnnxModelHandle",
    "import_onnxruntime",
    "is_onnx_path",
    "make_session",
    "load_onnx",
]


class _MissingBlock:
    """Stands for the output of a block the file does not hold (see :meth:`OnnxEncoder.iter_hidden_states`):
    any use raises a ``ValueError`` that says which block the file has and how to export another."""

    def __init__(self, block: int, exported: int) -> None:
        self._message = (
            f"block {block} is not in this .onnx file, which holds block {exported} only; "
            f"export it with eat-export --layer {block}"
        )

    def __getattr__(self, name: str) -> Any:
        raise ValueError(self._message)


class OnnxEncoder(nn.Module):
    """Stands where an :class:`~eat_fairseq.model.encoder.EATEncoder` stands for inference consumers.

    It has the encoder's ``cfg``, one entry per block in ``blocks`` (for ``len``), and
    :meth:`extract_features` / :meth:`hidden_states` computed by the onnxruntime session. Only the
    exported block is available; asking for another raises ``ValueError``. It owns no weights: the
    one zero-size parameter only tells ``next(encoder.parameters())`` users the device and dtype of
    the inputs it takes (CPU, float32).
    """

    def __init__(self, session: Any, meta: OnnxMetadata) -> None:
        super().__init__()
        self.session = session
        self.cfg = meta.encoder
        self.layer = meta.layer
        self.int8 = meta.int8
        self.windows_per_run = windows_per_run(session, meta.encoder.num_heads, meta.int8)
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(meta.encoder.depth))
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def extra_repr(self) -> str:
        return f"D={self.cfg.embed_dim}, depth={self.cfg.depth}, block={self.layer}, {'int8' if self.int8 else 'fp32'}"

    def check_layer(self, layer: int | None) -> None:
        """``ValueError`` unless ``layer`` (None: the exported one) is the exported block."""
        check_exported_layer(layer, self.cfg.depth, self.layer)

    def run(self, fbank: Tensor, names: tuple[str, ...]) -> list[Tensor]:
        """Outputs ``names`` of the session for normalised windows ``fbank`` ``(B, T, F)`` or ``(B, 1, T, F)``."""
        if fbank.ndim == 4:
            fbank = fbank.squeeze(1)
        if fbank.ndim != 3 or fbank.shape[-1] != self.cfg.num_mel_bins:
            raise ValueError(f"expected fbank of shape (B, T, {self.cfg.num_mel_bins}), got {tuple(fbank.shape)}")
        frames = fbank.shape[1]
        if frames == 0 or frames % self.cfg.patch_size or frames > self.cfg.patch_size * self.cfg.max_length:
            raise ValueError(
                f"T={frames} frames must be a positive multiple of {self.cfg.patch_size} up to "
                f"{self.cfg.patch_size * self.cfg.max_length}"
            )
        feed = fbank.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(out) for out in run_windows(self.session, list(names), feed, self.windows_per_run)]

    def extract_features(self, fbank: Tensor, layer: int | None = None) -> Tensor:
        """Features ``(B, 1+P, D)`` of the exported block, CLS first (as ``EATEncoder.extract_features``)."""
        self.check_layer(layer)
        return self.run(fbank, (FEATURES_NAME,))[0]

    def iter_hidden_states(self, fbank: Tensor, num_blocks: int | None = None) -> Iterator[Any]:
        """Block outputs up to the exported block, as ``EATEncoder.iter_hidden_states`` gives them.

        The file holds one block, so ``num_blocks`` must end at it; the earlier entries are
        placeholders that raise a ``ValueError`` naming the block when used (a probe that reads only
        the last one, such as ``eat-probe --layers last``, works as with the ``.pt``).
        """
        num_blocks = self.cfg.depth if num_blocks is None else num_blocks
        if num_blocks - 1 != self.layer:
            raise ValueError(
                f"this .onnx file holds block {self.layer} only, not the first {num_blocks} blocks; "
                f"export another with eat-export --layer {num_blocks - 1}"
            )
        for block in range(self.layer):
            yield _MissingBlock(block, self.layer)
        yield self.extract_features(fbank)

    def hidden_states(self, fbank: Tensor, num_blocks: int | None = None) -> list[Any]:
        """:meth:`iter_hidden_states` as a list."""
        return list(self.iter_hidden_states(fbank, num_blocks))


class OnnxClassifier(nn.Module):
    """Stands where an :class:`~eat_fairseq.model.classifier.EATClassifier` stands: ``forward`` gives logits."""

    def __init__(self, encoder: OnnxEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes

    def forward(self, fbank: Tensor) -> Tensor:
        """Normalised windows ``(B, T, F)`` -> logits ``(B, C)``."""
        return self.encoder.run(fbank, (LOGITS_NAME,))[0]


class OnnxModelHandle(EATModelHandle):
    """An :class:`~eat_fairseq.inference.api.EATModelHandle` whose encoder is an onnxruntime session.

    Everything but the encoder forward is the base class's code. Differences: it runs on the CPU
    only, ``layer`` must be the exported block (``None`` means it), and ``metadata`` holds what
    ``eat-export`` recorded.
    """

    def __init__(self, path: str, session: Any, meta: OnnxMetadata, batch_size: int = 8) -> None:
        encoder = OnnxEncoder(session, meta)
        classifier = OnnxClassifier(encoder, len(meta.labels)) if meta.kind == "classifier" and meta.labels else None
        super().__init__(
            encoder=encoder,  # type: ignore[arg-type]  # duck-typed stand-in for EATEncoder
            feature_cfg=meta.features,
            kind=meta.kind,
            classifier=classifier,  # type: ignore[arg-type]
            labels=meta.labels,
            multi_label=meta.multi_label,
            batch_size=batch_size,
            source=path,
        )
        self.metadata = meta

    @property
    def device(self) -> torch.device:
        """Always the CPU: onnxruntime's CPU provider runs the encoder, torch the fbank."""
        return torch.device("cpu")

    @property
    def int8(self) -> bool:
        return self.metadata.int8

    @property
    def exported_layer(self) -> int:
        """The 0-based block the file holds (``eat-export --layer``; default the last)."""
        return self.metadata.layer

    def check_layer(self, layer: int | None) -> None:
        self.encoder.check_layer(layer)  # type: ignore[operator]

    def __repr__(self) -> str:
        cfg = self.encoder.cfg
        head = f", {len(self.labels)} classes, {'multi' if self.multi_label else 'single'}-label" if self.labels else ""
        return (
            f"OnnxModelHandle({self.kind}, D={cfg.embed_dim}, block {self.exported_layer} of {cfg.depth}, "
            f"{'int8' if self.int8 else 'fp32'}, window={self.window_frames} frames{head})"
        )


def load_onnx(
    path: Union[str, "os.PathLike[str]"],
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 8,
    threads: int | None = None,
) -> OnnxModelHandle:
    """Load an ``eat-export`` file (what :func:`~eat_fairseq.inference.api.load_model` does for ``.onnx``).

    ``threads``: intra-op threads of the session (default: ``torch.get_num_threads()``). Raises
    :class:`OnnxUnavailableError` without onnxruntime and :class:`ModelLoadError` naming the file
    when it is missing, not ONNX, or not written by eat-export.
    """
    name = os.fspath(path)
    if torch.device(device).type != "cpu":
        raise ModelLoadError(f"{name}: .onnx models run on the CPU (onnxruntime); use the .pt checkpoint on {device}")
    session, meta = open_onnx(name, threads or torch.get_num_threads())
    return OnnxModelHandle(name, session, meta, batch_size=batch_size)
