"""``.onnx`` models of ``eat-export`` run without torch: audio -> numpy fbank -> onnxruntime -> pooling.

``eat-extract`` and ``eat-tag`` use this runner for ``.onnx`` files on the CPU. It never imports
torch (unless a clip must be resampled, see below), so a run starts in about a tenth of the time:
importing torch alone took 1.3-1.8 s on the machine we measured, more than an int8 EAT-base needs for
two 10 s clips. The Python API's :func:`eat_fairseq.load_model` still returns the torch handle
(:class:`eat_fairseq.inference.onnx_backend.OnnxModelHandle`) for an ``.onnx``, because its callers
(HEAR, the probes) want tensors; both give the same embeddings.

The steps are those of :class:`eat_fairseq.inference.api.EATModelHandle`, in numpy: the row reader
(:func:`eat_fairseq.data.clips.read_row_array`), mono mix-down, the fbank and windows of
:mod:`eat_fairseq.data.fbank_numpy`, the encoder (the onnxruntime session), then the same pooling:
the CLS outputs of a clip's windows weighted by their real frames (``utterance``), time patches
averaged over frequency with padding-only patches dropped (``frame``), every patch (``all``), and for
a classifier sigmoid / softmax scores per window combined by ``mean`` (weighted) or ``max``.
Clips at another rate than the model's go through torch's resampler
(:func:`eat_fairseq.data.audio.to_mono_16k`, imported then): one resampler for every path.
"""
from __future__ import annotations

import os
from typing import Any, Union

import numpy as np

from eat_fairseq.checkpoints.errors import ModelLoadError
from eat_fairseq.data.errors import AudioError
from eat_fairseq.data.fbank_numpy import fbank_numpy, split_windows_numpy
from eat_fairseq.data.feature_settings import num_frames
from eat_fairseq.inference.geometry import WindowGeometry
from eat_fairseq.inference.onnx_format import (
    FEATURES_NAME,
    LOGITS_NAME,
    OnnxMetadata,
    check_exported_layer,
    open_onnx,
    run_windows,
    windows_per_run,
)

__all__ = ["OnnxRunner", "load_runner"]

GRANULARITIES = ("utterance", "frame", "all")
AGGREGATES = ("mean", "max")


def _pcm_scale(dtype: np.dtype) -> float:
    """Integer PCM -> [-1, 1) as soundfile reads it (and as the torch handle scales integer arrays)."""
    if dtype == np.bool_:
        return 1.0
    return float(2 ** (np.iinfo(dtype).bits - 1))


class OnnxRunner(WindowGeometry):
    """An eat-export ``.onnx`` model behind the methods the CLIs use: :meth:`prepare`,
    :meth:`extract`, :meth:`predict_scores`, :meth:`check_layer` and the time geometry.

    Results are float32 numpy arrays equal (within float32 rounding of the fbank) to those of the
    torch handle of the same file or of its ``.pt``.
    """

    def __init__(
        self, path: str, session: Any, meta: OnnxMetadata, batch_size: int = 8, threads: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        enc, feat = meta.encoder, meta.features
        window = feat.target_length
        if window is None or window <= 0 or window % enc.patch_size or window > enc.patch_size * enc.max_length:
            raise ModelLoadError(f"{path}: target_length {window} does not fit the encoder's patches and positions")
        self.session = session
        self.metadata = meta
        self.feature_cfg = feat
        self.kind = meta.kind
        self.labels = meta.labels
        self.multi_label = meta.multi_label
        self.batch_size = batch_size  # clips prepared together; onnxruntime runs windows_per_run at a time
        self.windows_per_run = windows_per_run(session, enc.num_heads, meta.int8)
        self.source = path
        self.threads = threads  # also torch's, should a clip need its resampler

    def __repr__(self) -> str:
        cfg = self.metadata.encoder
        return (
            f"OnnxRunner({self.kind}, D={cfg.embed_dim}, block {self.metadata.layer} of {cfg.depth}, "
            f"{'int8' if self.metadata.int8 else 'fp32'}, window={self.window_frames} frames)"
        )

    # -- geometry (names as on EATModelHandle) -----------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return int(self.feature_cfg.sample_rate)

    @property
    def window_frames(self) -> int:
        return int(self.feature_cfg.target_length)

    @property
    def patch_frames(self) -> int:
        return int(self.metadata.encoder.patch_size)

    @property
    def num_freq_patches(self) -> int:
        return int(self.metadata.encoder.grid_w)

    @property
    def embed_dim(self) -> int:
        return int(self.metadata.encoder.embed_dim)

    @property
    def num_layers(self) -> int:
        return int(self.metadata.encoder.depth)

    def check_layer(self, layer: int | None) -> None:
        """``ValueError`` unless ``layer`` (None: the exported one) is the block the file holds."""
        check_exported_layer(layer, self.num_layers, self.metadata.layer)

    # -- audio ------------------------------------------------------------------------------------

    def prepare(self, audio: Any, sample_rate: int | None = None, source: str | None = None) -> np.ndarray:
        """One clip (a path, or a ``(samples,)`` / ``(channels, samples)`` array at ``sample_rate``)
        -> mono float32 waveform ``(S,)`` at the model's rate; errors as
        :meth:`eat_fairseq.inference.api.EATModelHandle.prepare` raises them."""
        if isinstance(audio, (str, os.PathLike)):
            from eat_fairseq.data.clips import read_row_array
            from eat_fairseq.data.manifest import ManifestRow

            name = os.fspath(audio)
            wave, sr = read_row_array(ManifestRow(path=name, num_samples=0, line=0, rel=name))
        else:
            wave = np.asarray(audio)
            sr = int(sample_rate) if sample_rate is not None else self.sample_rate
            name = source or "<array>"
            if wave.ndim not in (1, 2):
                raise ValueError(f"audio arrays must be (samples,) or (channels, samples), got shape {wave.shape}")
            if wave.ndim == 2 and wave.shape[0] > wave.shape[1]:
                raise ValueError(
                    f"audio of shape {wave.shape} looks like (samples, channels); "
                    "pass (channels, samples), e.g. wave.T, or a list of 1-D clips for a batch"
                )
            if not np.issubdtype(wave.dtype, np.floating):
                wave = wave.astype(np.float64) / _pcm_scale(wave.dtype)
            wave = wave.astype(np.float32, copy=False)
            if wave.size == 0:
                raise AudioError("audio array contains no samples")
            if not np.isfinite(wave).all():
                raise AudioError("audio array contains NaN or infinite samples")
        mono = wave.mean(axis=0, dtype=np.float32) if wave.ndim == 2 else wave
        if sr != self.sample_rate:
            mono = self._resample(mono, sr)
        if num_frames(mono.shape[-1], self.sample_rate) == 0:
            raise AudioError(f"{name}: audio is shorter than one 25 ms frame ({mono.shape[-1]} samples)")
        return np.ascontiguousarray(mono, dtype=np.float32)

    def _resample(self, mono: np.ndarray, sr: int) -> np.ndarray:
        if sr <= 0:
            raise ValueError(f"sample rates must be positive, got sr={sr}")
        import torch

        from eat_fairseq.data.audio import to_mono_16k

        if self.threads:
            torch.set_num_threads(int(self.threads))

        return to_mono_16k(torch.from_numpy(np.ascontiguousarray(mono)), sr, self.sample_rate).numpy()

    def _prepare_all(self, audio: Any, sample_rate: int | None) -> tuple[list[np.ndarray], bool]:
        if isinstance(audio, (list, tuple)):
            return [self.prepare(a, sample_rate) for a in audio], False
        return [self.prepare(audio, sample_rate)], True

    # -- pipeline ---------------------------------------------------------------------------------

    def windows(self, waves: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]]:
        """Mono waveforms at the model rate -> ``(windows (N, L, F) normalised, real frames per window per clip)``."""
        pieces, valid = zip(*(split_windows_numpy(fbank_numpy(w, self.feature_cfg), self.feature_cfg) for w in waves))
        return np.concatenate(pieces), list(valid)

    def _run(self, windows: np.ndarray, name: str) -> np.ndarray:
        return run_windows(self.session, [name], windows, self.windows_per_run)[0].astype(np.float32, copy=False)

    def embed_waveforms(self, waves: list[np.ndarray], patches: bool = False) -> list[dict[str, np.ndarray]]:
        """Per clip ``{"utterance" (D,), "frame" (H, D)[, "patches" (H, W, D)]}``, pooled as the torch handle pools."""
        windows, valid = self.windows(waves)
        tokens = self._run(windows, FEATURES_NAME)  # (N, 1 + P, D), CLS first
        n, _, d = tokens.shape
        grid = tokens[:, 1:].reshape(n, -1, self.num_freq_patches, d)  # (N, H, W, D), time-major
        cls, frame = tokens[:, 0], grid.mean(axis=2, dtype=np.float32)
        results: list[dict[str, np.ndarray]] = []
        start = 0
        for counts in valid:
            stop = start + len(counts)
            weights = np.asarray(counts, dtype=np.float32)
            keep = [-(-c // self.patch_frames) for c in counts]  # time patches with real frames
            item = {
                "utterance": (cls[start:stop] * weights[:, None]).sum(0) / weights.sum(),
                "frame": np.concatenate([frame[start + k, :h] for k, h in enumerate(keep)]),
            }
            if patches:
                item["patches"] = np.concatenate([grid[start + k, :h] for k, h in enumerate(keep)])
            results.append(item)
            start = stop
        return results

    def extract(self, audio: Any, sample_rate: int | None = None, granularity: str = "utterance", layer: int | None = None) -> Any:
        """Embeddings of one clip or a list of clips, as :meth:`EATModelHandle.extract` gives them."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.check_layer(layer)
        waves, single = self._prepare_all(audio, sample_rate)
        if not waves:
            return []
        results: list[Any] = []
        for wave, item in zip(waves, self.embed_waveforms(waves, patches=granularity == "all")):
            if granularity == "all":
                item["timestamps"] = self.timestamps(item["frame"].shape[0], num_samples=wave.shape[-1])
                results.append(item)
            else:
                results.append(item[granularity])
        return results[0] if single else results

    def predict_scores(self, audio: Any, sample_rate: int | None = None, aggregate: str = "mean") -> Any:
        """Class scores ``(C,)`` of one clip or a list, as :meth:`EATModelHandle.predict_scores` gives them."""
        if self.kind != "classifier" or self.labels is None:
            raise ValueError(
                f"{self.source} is a {self.kind} model without a classification head; "
                "tagging needs a fine-tuned checkpoint (use extract() for embeddings)"
            )
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        waves, single = self._prepare_all(audio, sample_rate)
        if not waves:
            return []
        windows, valid = self.windows(waves)
        logits = self._run(windows, LOGITS_NAME).astype(np.float64)
        if self.multi_label:
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = shifted / shifted.sum(axis=-1, keepdims=True)
        probs = probs.astype(np.float32)
        results: list[np.ndarray] = []
        start = 0
        for counts in valid:
            window_probs = probs[start : start + len(counts)]
            if aggregate == "max":
                scores = window_probs.max(axis=0)
            else:
                weights = np.asarray(counts, dtype=np.float32)
                scores = (window_probs * weights[:, None]).sum(0) / weights.sum()
            results.append(scores)
            start += len(counts)
        return results[0] if single else results


def load_runner(path: Union[str, "os.PathLike[str]"], batch_size: int = 8, threads: int | None = None) -> OnnxRunner:
    """An :class:`OnnxRunner` for an eat-export file (``threads``: intra-op threads, default
    :func:`eat_fairseq.inference.onnx_format.default_threads`); errors as :func:`open_onnx` raises them."""
    name = os.fspath(path)
    session, meta = open_onnx(name, threads)
    return OnnxRunner(name, session, meta, batch_size=batch_size, threads=threads)
