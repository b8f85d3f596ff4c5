"""Where a model's windows and time patches lie in the audio, without torch.

Shared by the torch handle (:class:`eat_fairseq.inference.api.EATModelHandle`) and the torch-free
ONNX runner (:class:`eat_fairseq.inference.onnx_runner.OnnxRunner`), so both give the same
timestamps and patch counts.
"""
from __future__ import annotations

import numpy as np

from eat_fairseq.data.feature_settings import frame_geometry, num_frames

__all__ = ["WindowGeometry"]


class WindowGeometry:
    """Time geometry of a model from ``sample_rate``, ``window_frames`` and ``patch_frames``
    (provided by the class it is mixed into)."""

    sample_rate: int
    window_frames: int
    patch_frames: int

    @property
    def patch_seconds(self) -> float:
        """Hop between consecutive time patches in seconds (16 frames x 10 ms = 0.16 s)."""
        _, shift, _ = frame_geometry(self.sample_rate)
        return self.patch_frames * shift / self.sample_rate

    @property
    def frame_rate(self) -> float:
        """Frame embeddings (time patches) per second: 6.25."""
        return 1.0 / self.patch_seconds

    @property
    def window_seconds(self) -> float:
        """Audio covered by one full window (1024 frames -> 10.24 s)."""
        _, shift, _ = frame_geometry(self.sample_rate)
        return self.window_frames * shift / self.sample_rate

    def num_patches(self, num_samples: int) -> int:
        """Frame embeddings (time patches) a clip of ``num_samples`` samples at the model rate gets."""
        return -(-num_frames(num_samples, self.sample_rate) // self.patch_frames)

    def timestamps(self, num_patches: int, num_samples: int | None = None) -> np.ndarray:
        """Centre (seconds) of each of ``num_patches`` time patches: ``0.16 j + 0.0875``.

        Patch ``j`` spans frames ``16 j .. 16 j + 15``; frame ``i`` covers samples
        ``[160 i, 160 i + 400)``, so the patch covers ``[0.16 j, 0.16 j + 0.175)`` s. With
        ``num_samples`` (the clip's length at the model rate) a patch is centred on the frames the
        clip really has, so the last, partly padded patch stays inside the audio.
        """
        window, shift, _ = frame_geometry(self.sample_rate)
        first = np.arange(num_patches) * self.patch_frames  # first frame of each patch
        last = first + self.patch_frames - 1
        if num_samples is not None:
            last = np.minimum(last, max(num_frames(num_samples, self.sample_rate) - 1, 0))
        return (first * shift + last * shift + window) / 2.0 / self.sample_rate
