"""HEAR 2021 API (https://hearbenchmark.com/hear-api.html) for EAT checkpoints.

    import eat_fairseq.inference.hear as hear
    model = hear.load_model("eat_base_pretrained.pt")
    scene = hear.get_scene_embeddings(audio, model)           # (n_sounds, D)
    frames, ts = hear.get_timestamp_embeddings(audio, model)  # (n_sounds, n_timestamps, D), ms

``audio`` is a float tensor (or numpy array) ``(n_sounds, n_samples)`` of mono 16 kHz audio in
[-1, 1]. Sounds with NaN or infinite samples, and sounds shorter than one 25 ms fbank frame (400
samples), are refused with a ``ValueError`` instead of returning NaN or padding-only embeddings.

- Scene embedding: the encoder's CLS output (for sounds longer than one window, the mean of the
  per-window CLS outputs weighted by their real frames; see :mod:`eat_fairseq.inference.api`).
- Timestamp embeddings: one per 160 ms time patch, the mean over its 8 frequency patches; the
  timestamp is the patch centre, ``160 j + 87.5`` ms (patch ``j`` spans ``[160 j, 160 j + 175)`` ms
  because a fbank frame is 25 ms long). So ``n_timestamps = ceil(n_frames / 16)`` with
  ``n_frames = 1 + (n_samples - 400) // 160``. The last patch, when the sound ends inside it, is
  centred on the frames the sound has, so every timestamp lies within the sound (1 s: 977.5 ms last).

Both come from the last block by default; set ``model.layer`` to use another block (0-based).
Runs on the pure-PyTorch packages only (no fairseq needed). ``model.to("cuda")`` moves the encoder;
embeddings are computed on the model's device and returned on the audio's device.

An ``.onnx`` file written by ``eat-export`` is accepted like a checkpoint: its encoder runs on the
CPU with onnxruntime (``pip install 'eat_fairseq[onnx]'``), its block is the one exported.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from eat_fairseq.inference.api import EATModelHandle
from eat_fairseq.inference.api import load_model as _load_handle
from eat_fairseq.data.features import frame_geometry

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings", "CHECKPOINT_ENV"]

CHECKPOINT_ENV = "EAT_HEAR_CHECKPOINT"
"""Environment variable naming the checkpoint when ``load_model`` gets an empty path."""


class HearModel(nn.Module):
    """The HEAR model object: an EAT encoder (a registered submodule, so ``.to()`` moves it) plus the
    attributes the HEAR API requires."""

    sample_rate: int = 16000

    def __init__(self, handle: EATModelHandle, layer: Optional[int] = None) -> None:
        super().__init__()
        if handle.sample_rate != self.sample_rate:
            raise ValueError(f"HEAR audio is 16 kHz but the checkpoint's features run at {handle.sample_rate} Hz")
        handle.check_layer(layer)
        self.handle = handle
        self.encoder = handle.encoder
        self.layer = layer
        self.scene_embedding_size = handle.embed_dim
        self.timestamp_embedding_size = handle.embed_dim

    def forward(self, audio: Tensor) -> Tensor:
        """Scene embeddings, so the module is also usable as a plain ``nn.Module``."""
        return get_scene_embeddings(audio, self)


def load_model(model_file_path: str = "", device: Optional[str] = None, layer: Optional[int] = None) -> HearModel:
    """Load an EAT checkpoint (any kind :func:`eat_fairseq.inference.api.load_model` accepts, ``.onnx``
    included) as a HEAR model.

    An empty ``model_file_path`` reads the path from ``$EAT_HEAR_CHECKPOINT`` (nothing is downloaded).
    ``device`` defaults to CUDA when available (the CPU for ``.onnx`` files, which run there).
    """
    from eat_fairseq.inference.onnx_backend import is_onnx_path

    path = model_file_path or os.environ.get(CHECKPOINT_ENV, "")
    if not path:
        raise ValueError(f"no checkpoint: pass model_file_path or set ${CHECKPOINT_ENV}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not is_onnx_path(path) else "cpu"
    return HearModel(_load_handle(path, device=device), layer=layer)


def _check_audio(audio: Any, model: HearModel) -> Tensor:
    """``audio`` as a float tensor ``(n_sounds, n_samples)``, or a ``ValueError`` saying what is wrong."""
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from eat_fairseq.inference.hear.load_model, got {type(model).__name__}")
    if not isinstance(audio, Tensor):
        audio = torch.as_tensor(np.asarray(audio))
    if audio.dim() != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ValueError(f"audio must be float samples in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[0] == 0:
        return audio.detach().float()
    shortest = _min_samples(model)
    if audio.shape[1] < shortest:
        raise ValueError(
            f"audio has {audio.shape[1]} samples per sound; at least {shortest} (one 25 ms fbank frame at "
            f"{model.sample_rate} Hz) are needed"
        )
    bad = (~torch.isfinite(audio)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"audio contains NaN or infinite samples (sounds {bad[:10]})")
    return audio.detach().float()


def _min_samples(model: HearModel) -> int:
    """Samples of one fbank frame (400 at 16 kHz): a shorter sound has no features at all."""
    window, _, _ = frame_geometry(model.sample_rate)
    return window


def _embed(audio: Tensor, model: HearModel) -> list[dict[str, Tensor]]:
    if audio.shape[0] == 0:
        return []
    return model.handle.embed_waveforms(list(audio.unbind(0)), layer=model.layer)


def get_scene_embeddings(audio: Any, model: HearModel) -> Tensor:
    """``audio (n_sounds, n_samples)`` at 16 kHz -> ``(n_sounds, scene_embedding_size)``."""
    audio = _check_audio(audio, model)
    items = _embed(audio, model)
    if not items:
        return torch.zeros(0, model.scene_embedding_size, device=audio.device)
    return torch.stack([item["utterance"] for item in items]).to(audio.device)


def get_timestamp_embeddings(audio: Any, model: HearModel) -> tuple[Tensor, Tensor]:
    """``audio (n_sounds, n_samples)`` at 16 kHz -> ``(embeddings (n_sounds, n_timestamps, D),
    timestamps (n_sounds, n_timestamps) in milliseconds)``: one per 160 ms time patch, at its centre
    (the last one within the sound, see the module docstring)."""
    audio = _check_audio(audio, model)
    items = _embed(audio, model)
    n_samples = int(audio.shape[-1])
    if not items:
        n = model.handle.num_patches(n_samples) if n_samples >= _min_samples(model) else 0
        return (
            torch.zeros(0, n, model.timestamp_embedding_size, device=audio.device),
            torch.zeros(0, n, device=audio.device),
        )
    frames = torch.stack([item["frame"] for item in items]).to(audio.device)
    seconds = model.handle.timestamps(frames.shape[1], num_samples=n_samples)
    ms = torch.as_tensor(seconds * 1000.0, dtype=torch.float32)
    return frames, ms.to(audio.device).unsqueeze(0).expand(frames.shape[0], -1).contiguous()
