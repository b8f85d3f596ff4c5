"""Audio datasets for fairseq: a TSV manifest in, normalised Kaldi fbank out.

The manifest format is the release's (reference section 6): the first line is the root folder, then
one ``relative/path<TAB>n_samples`` row per clip. Features are computed in the data-loader workers
(``dataset.num_workers``), and so are the pre-training masks when a :class:`MaskSpec` is given, as in
the release, so the training loop only gathers tensors.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset

from eat_fairseq.core.audio import AudioError, load_audio, to_mono_16k
from eat_fairseq.core.features import FeatureConfig, waveform_to_features
from eat_fairseq.core.manifest import ManifestError, ManifestRow, read_manifest  # noqa: F401  (re-exported)
from eat_fairseq.core.masking import inverse_block_mask

logger = logging.getLogger(__name__)


@dataclass
class MaskSpec:
    """Settings for computing inverse block masks in the collater (pre-training only)."""

    clone_batch: int = 16
    mask_prob: float = 0.8
    mask_length: int = 5
    mask_prob_adjust: float = 0.07
    patch_size: int = 16
    seed: int = 1


class EATAudioDataset(FairseqDataset):
    """Clips from a manifest as normalised fbank ``(1, T, F)`` (reference section 1).

    Args:
        manifest: path of ``{split}.tsv``.
        features: feature settings (target length, normalisation statistics).
        min_samples: clips whose manifest length (native rate) is below this are dropped at load time
            and counted in the log.
        on_error: ``"raise"`` (default) stops on a missing/unreadable/NaN file with an error naming the
            file and manifest line; ``"skip"`` drops the clip from its batch, logs it and counts it in
            the batch's ``skipped`` field.
        mask: when set, the collater adds ``net_input["mask"]`` of shape ``(B * clone_batch, P)``.
        shuffle: random order per epoch (training) or manifest order.
    """

    def __init__(
        self,
        manifest: str,
        features: Optional[FeatureConfig] = None,
        min_samples: int = 0,
        on_error: str = "raise",
        mask: Optional[MaskSpec] = None,
        shuffle: bool = True,
        seed: int = 1,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.manifest = manifest
        self.features = features or FeatureConfig()
        self.on_error = on_error
        self.mask = mask
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1
        self.root, rows = read_manifest(manifest)
        kept = [r for r in rows if r.num_samples >= max(min_samples, 1)]
        n_short = len(rows) - len(kept)
        if n_short:
            logger.info(
                "%s: skipped %d of %d clips shorter than min_samples=%d", manifest, n_short, len(rows), min_samples
            )
        self.num_short_skipped = n_short
        self.rows = kept
        self.sizes = np.array([r.num_samples for r in kept], dtype=np.int64)
        logger.info("%s: %d clips", manifest, len(kept))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def target_length(self) -> int:
        return self.features.target_length

    def load_features(self, index: int) -> torch.Tensor:
        """(T, F) normalised fbank of one clip; raises AudioError naming the file and manifest line."""
        row = self.rows[index]
        try:
            wave, sr = load_audio(row.path)
        except AudioError as e:
            raise AudioError(f"{e} (manifest {self.manifest}, line {row.line})") from e
        except Exception as e:  # anything soundfile or the OS throws: still name the file
            raise AudioError(f"cannot load {row.path} (manifest {self.manifest}, line {row.line}): {e}") from e
        mono = to_mono_16k(wave, sr, self.features.sample_rate)
        return waveform_to_features(mono, self.features.sample_rate, self.features)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            feats = self.load_features(index)
        except AudioError as e:
            if self.on_error == "raise":
                raise
            logger.warning("skipping bad clip: %s", e)
            return {"id": index, "source": None}
        return {"id": index, "source": feats.unsqueeze(0)}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        good = [s for s in samples if s["source"] is not None]
        skipped = len(samples) - len(good)
        if not good:
            if skipped:
                logger.warning("all %d clips of a batch were unreadable (listed above); the batch is skipped", skipped)
            return {}
        source = torch.stack([s["source"] for s in good])  # (B, 1, T, F)
        ids = torch.tensor([s["id"] for s in good], dtype=torch.long)
        batch: Dict[str, Any] = {"id": ids, "net_input": {"source": source}, "skipped": skipped}
        if self.mask is not None:
            batch["net_input"]["mask"] = self.compute_mask(ids, source.shape[2])
        return batch

    def compute_mask(self, ids: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Masks for ``clone_batch`` copies of each clip, seeded by (seed, epoch, clip ids).

        Seeding by content rather than by a worker's RNG state keeps masks reproducible whatever the
        number of workers.
        """
        m = self.mask
        assert m is not None
        grid = (num_frames // m.patch_size, self.features.num_mel_bins // m.patch_size)
        key = f"{m.seed}:{self.epoch}:" + ",".join(str(i) for i in ids.tolist())
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
        gen = torch.Generator().manual_seed(seed)
        return inverse_block_mask(
            len(ids) * m.clone_batch,
            grid,
            mask_prob=m.mask_prob,
            mask_length=m.mask_length,
            mask_prob_adjust=m.mask_prob_adjust,
            generator=gen,
        )

    def num_tokens(self, index: int) -> int:
        # every clip is padded or cropped to target_length frames, so batches cost the same per clip
        return self.features.target_length

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return np.full(len(indices), self.features.target_length, dtype=np.int64)

    def size(self, index: int) -> int:
        return self.features.target_length

    def ordered_indices(self) -> np.ndarray:
        if self.shuffle:
            return np.random.RandomState(self.seed + self.epoch).permutation(len(self))
        return np.arange(len(self))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        # the order (and the masks) depend on the epoch
        return False

    def filter_indices_by_size(self, indices: np.ndarray, max_sizes: Any):
        return indices, []
