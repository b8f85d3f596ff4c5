"""Audio datasets for fairseq: a TSV manifest in, normalised Kaldi fbank (+ targets) out.

The manifest format is the release's (docs/reference.md section 6): the first line is the root folder,
then one ``relative/path<TAB>n_samples`` row per clip; rows may also address a span of a long file or a
member of a zip shard (:mod:`eat_fairseq.data.manifest`). Rows are read by the one row reader
(:mod:`eat_fairseq.data.clips`) and turned into features by the one feature path
(:func:`eat_fairseq.data.features.waveform_to_features`). Features are computed in the data-loader
workers (``dataset.num_workers``), and so are the pre-training masks when a
:class:`~eat_fairseq.model.masking.MaskSpec` is given, as in the release, so the training loop only
gathers tensors.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from fairseq.data import FairseqDataset

from eat_fairseq.data import augment
from eat_fairseq.data.audio import AudioError, to_mono_16k
from eat_fairseq.data.clips import CROP_MODES, read_row_window
from eat_fairseq.data.features import FeatureConfig, waveform_to_features
from eat_fairseq.data.labels import LabelError, LabelTable
from eat_fairseq.data.manifest import (  # noqa: F401  (ManifestError, ManifestRow, read_manifest: re-exported)
    ManifestError,
    ManifestRow,
    ManifestRows,
    read_manifest,
    read_manifest_rows,
)
from eat_fairseq.data.sampling import WeightedEpochSampler
from eat_fairseq.model.masking import MaskSpec

logger = logging.getLogger(__name__)


PLACEHOLDER = "placeholder"


def is_placeholder(sample: Any) -> bool:
    """Whether a batch stands for clips that were all unreadable (nothing to train or evaluate on)."""
    return isinstance(sample, dict) and bool(sample.get(PLACEHOLDER, False))


class EATAudioDataset(FairseqDataset):
    """Clips from a manifest as normalised fbank ``(1, T, F)`` (docs/reference.md section 1).

    Rows may address whole files, spans of long files or members of zip shards
    (:mod:`eat_fairseq.data.manifest`); only the frames the crop window uses are read.

    Args:
        manifest: path of ``{split}.tsv``; its root folder (line 1) must exist.
        features: feature settings (target length, normalisation statistics).
        min_samples: clips whose manifest length (native rate) is below this are dropped at load time
            and counted in the log.
        on_error: ``"raise"`` (default) stops on a missing/unreadable/NaN file with an error naming the
            file and manifest line; ``"skip"`` logs the clip and leaves it out (see ``replace_bad``);
            the batch's ``skipped`` field counts such clips.
        mask: when set, the collater adds ``net_input["mask"]`` of shape ``(B * clone_batch, P)``, drawn
            from ``(seed, epoch, clip ids)`` (the model's :class:`MaskSpec`).
        shuffle: random order per epoch (training) or manifest order.
        crop: ``"start"`` (release): the first ``target_length`` frames; ``"random"``: a window at a
            random start drawn from (seed, epoch, manifest line), so any worker and a resumed run
            draw the same window.
        whole_file: decode whole clips and crop after the fbank, as the release did (cost grows with
            the file's length; features of clips longer than the window differ from the default's by
            float32 rounding only, see :func:`eat_fairseq.data.clips.read_row_window`).
        replace_bad: with ``on_error="skip"``, put a readable clip (drawn from the seed, epoch and
            index) in place of a bad one, so every training batch is full and real: fairseq would
            otherwise take a step from its zero-gradient dummy batch, or crash when that dummy is
            empty. Default: ``shuffle`` (training). Without it (evaluation) bad clips are dropped and
            an all-bad batch becomes a placeholder that the tasks evaluate as nothing.

    The rows are held as a :class:`~eat_fairseq.data.manifest.ManifestRows` (flat numpy arrays,
    ``self.rows[i]`` builds the :class:`ManifestRow` on demand): a list of row objects would cost
    about 400 bytes per clip in every process and be copied page by page into every forked
    data-loader worker as it touches the rows. ``kept_ordinals`` maps each clip to its position
    among the manifest's data rows when ``min_samples`` dropped some (None when none was dropped),
    so per-row side files (labels, weights) can be aligned.
    """

    MAX_REPLACEMENT_TRIES = 32

    def __init__(
        self,
        manifest: str,
        features: Optional[FeatureConfig] = None,
        min_samples: int = 0,
        on_error: str = "raise",
        mask: Optional[MaskSpec] = None,
        shuffle: bool = True,
        seed: int = 1,
        crop: str = "start",
        whole_file: bool = False,
        replace_bad: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if crop == "random" and whole_file:
            raise ValueError("crop='random' reads a window of each clip; it cannot be combined with whole-file reads")
        self.manifest = manifest
        self.features = features or FeatureConfig()
        self.on_error = on_error
        self.mask = mask
        self.shuffle = shuffle
        self.seed = seed
        self.crop = crop
        self.whole_file = whole_file
        self.replace_bad = shuffle if replace_bad is None else replace_bad
        self.epoch = 1
        self._bad: set = set()  # indices found unreadable in this process
        rows = read_manifest_rows(manifest, check_root=True)
        self.root = rows.root
        keep = rows.sizes >= max(min_samples, 1)
        n_short = len(rows) - int(np.count_nonzero(keep))
        if n_short:
            logger.info(
                "%s: skipped %d of %d clips shorter than min_samples=%d", manifest, n_short, len(rows), min_samples
            )
        self.num_short_skipped = n_short
        self.kept_ordinals: Optional[np.ndarray] = np.flatnonzero(keep) if n_short else None
        self.rows: ManifestRows = rows.select(keep) if n_short else rows
        self.sizes = self.rows.sizes
        logger.info(
            "%s: %d clips (crop=%s%s)", manifest, len(self.rows), crop, ", whole-file reads" if whole_file else ""
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def target_length(self) -> int:
        return self.features.target_length

    def _seed(self, *parts: Any) -> int:
        key = ":".join(str(p) for p in (self.seed, self.epoch, *parts))
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)

    def load_wave(self, index: int) -> tuple[torch.Tensor, int]:
        """The samples of clip ``index`` the features use, ``(wave (C, S), sample_rate)``; raises
        AudioError naming the file and manifest line."""
        row = self.rows[index]
        try:
            return read_row_window(
                row,
                self.features,
                crop=self.crop,
                seed=self._seed("crop", row.line) if self.crop == "random" else None,
                whole_file=self.whole_file,
                manifest=self.manifest,
            )
        except AudioError:
            raise
        except Exception as e:  # anything soundfile or the OS throws: still name the file
            raise AudioError(f"cannot load {row.describe()} (manifest {self.manifest}, line {row.line}): {e}") from e

    def load_features(self, index: int) -> torch.Tensor:
        """(T, F) normalised fbank of one clip; raises AudioError naming the file and manifest line."""
        wave, sr = self.load_wave(index)
        mono = to_mono_16k(wave, sr, self.features.sample_rate)
        return waveform_to_features(mono, self.features.sample_rate, self.features)

    def _replacement(self, index: int, first_error: AudioError) -> tuple[int, torch.Tensor]:
        """A readable clip to stand in for the unreadable ``index`` (training with ``skip``)."""
        rng = random.Random(self._seed("replace", index))
        for _ in range(self.MAX_REPLACEMENT_TRIES):
            j = rng.randrange(len(self))
            if j in self._bad:
                continue
            try:
                return j, self.load_features(j)
            except AudioError as e:
                self._bad.add(j)
                logger.warning("skipping bad clip: %s", e)
        raise AudioError(
            f"on_bad_file=skip: {first_error}; and none of {self.MAX_REPLACEMENT_TRIES} clips drawn to replace "
            f"it could be read either: is the root folder on line 1 of {self.manifest} the right one?"
        ) from first_error

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            return {"id": index, "source": self.load_features(index).unsqueeze(0), "skipped": 0}
        except AudioError as e:
            if self.on_error == "raise":
                raise
            if index not in self._bad:
                self._bad.add(index)
                logger.warning("skipping bad clip: %s", e)
            if not self.replace_bad:
                return {"id": index, "source": None, "skipped": 1}
            j, feats = self._replacement(index, e)
            return {"id": j, "source": feats.unsqueeze(0), "skipped": 1}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}  # fairseq pads uneven shards with empty batches and runs its dummy batch for them
        good = [s for s in samples if s["source"] is not None]
        skipped = sum(int(s.get("skipped", 0)) for s in samples)
        if not good:
            # Never {}: fairseq keeps the first batch as its dummy and asserts it is non-empty.
            logger.warning("all %d clips of a batch were unreadable (listed above)", len(samples))
            return self.placeholder_batch(skipped)
        source = torch.stack([s["source"] for s in good])  # (B, 1, T, F)
        ids = torch.tensor([s["id"] for s in good], dtype=torch.long)
        batch: Dict[str, Any] = {"id": ids, "net_input": {"source": source}, "skipped": skipped}
        if self.mask is not None:
            batch["net_input"]["mask"] = self.compute_mask(ids, source.shape[2])
        return batch

    def placeholder_batch(self, skipped: int) -> Dict[str, Any]:
        """A batch of zero clips standing for an all-unreadable evaluation batch; the tasks count it
        in ``skipped`` and compute nothing from it (see :func:`is_placeholder`)."""
        source = torch.zeros(0, 1, self.features.target_length or 0, self.features.num_mel_bins)
        return {
            "id": torch.zeros(0, dtype=torch.long),
            "net_input": {"source": source},
            "skipped": skipped,
            PLACEHOLDER: True,
        }

    def compute_mask(self, ids: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Masks for ``clone_batch`` copies of each clip, seeded by (seed, epoch, clip ids).

        Seeding by content rather than by a worker's RNG state keeps masks reproducible whatever the
        number of workers.
        """
        spec = self.mask
        assert spec is not None
        key = f"{self.seed}:{self.epoch}:" + ",".join(str(i) for i in ids.tolist())
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
        gen = torch.Generator().manual_seed(seed)
        return spec.draw(len(ids) * spec.clone_batch, spec.grid(num_frames, self.features.num_mel_bins), generator=gen)

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


class EATLabelledDataset(EATAudioDataset):
    """:class:`EATAudioDataset` plus a ``target`` per clip and the clip-level training augmentations.

    ``target`` in a batch is a multi-hot float (B, C) (multi-label) or class indices (B,) (single
    label). With ``sampler`` set, each epoch is the sampler's weighted draw (balanced sampling).
    ``labels`` holds one list of class indices per manifest row (or a :class:`LabelTable`); they are
    kept flat (:class:`~eat_fairseq.data.labels.LabelTable`) for the reason the rows are, and
    ``self.labels[i]`` gives clip ``i``'s list back.
    """

    def __init__(
        self,
        manifest: str,
        labels: Union[Sequence[Sequence[int]], LabelTable],
        num_classes: int,
        multi_label: bool,
        augment_clips: bool = False,
        roll_and_gain: bool = False,
        noise_and_roll: bool = False,
        sampler: Optional[WeightedEpochSampler] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manifest, **kwargs)
        num_rows = len(self.rows) + self.num_short_skipped
        if num_rows != len(labels):
            raise LabelError(f"{manifest}: {num_rows} rows but {len(labels)} label lines")
        table = labels if isinstance(labels, LabelTable) else LabelTable.from_lists(labels)
        # the base class may have dropped short clips: keep the labels of the surviving rows
        self.labels: LabelTable = table if self.kept_ordinals is None else table.select(self.kept_ordinals)
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.augment_clips = augment_clips
        self.use_roll_and_gain = roll_and_gain
        self.use_noise_and_roll = noise_and_roll
        self.sampler = sampler

    def _clip_generator(self, index: int) -> torch.Generator:
        """Per-clip, per-epoch seed: reproducible whatever the number of loader workers."""
        key = (int(self.seed) * 1_000_003 + int(self.epoch)) * 10_000_019 + int(index)
        return torch.Generator().manual_seed(key % (2**63))

    def load_features(self, index: int) -> torch.Tensor:
        if not (self.augment_clips and (self.use_roll_and_gain or self.use_noise_and_roll)):
            return super().load_features(index)
        wave, sr = self.load_wave(index)
        gen = self._clip_generator(index)
        mono = to_mono_16k(wave, sr, self.features.sample_rate)
        if self.use_roll_and_gain:
            mono = augment.roll_and_gain(mono, generator=gen)
        feats = waveform_to_features(mono, self.features.sample_rate, self.features)
        if self.use_noise_and_roll:
            feats = augment.noise_and_roll(feats, generator=gen)
        return feats

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = super().__getitem__(index)
        item["target"] = self.labels[item["id"]]  # the id of a replacement clip when one stood in
        return item

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().collater(samples)
        if not batch:
            return batch
        labels = [self.labels[i] for i in batch["id"].tolist()]
        if self.multi_label:
            target = torch.zeros(len(labels), self.num_classes)
            for row, classes in enumerate(labels):
                target[row, classes] = 1.0
        else:
            target = torch.tensor([classes[0] for classes in labels], dtype=torch.long)
        batch["target"] = target
        return batch

    def ordered_indices(self) -> np.ndarray:
        if self.sampler is not None:
            return self.sampler.indices(self.epoch)
        return super().ordered_indices()
