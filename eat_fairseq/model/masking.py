"""Inverse block masking on the (time x frequency) patch grid (docs/reference.md section 3).

EAT keeps only ~20% of the patches visible and chooses them as a union of square blocks, so the
student sees a few contiguous time-frequency regions and must predict everything else. The mask is
"inverse": blocks mark what stays *visible*, and the final mask (True = masked) is the complement.

Every row gets exactly the same number of visible patches, so the visible tokens of a batch gather
into a dense ``(B, V, D)`` tensor. All functions here are pure: the only source of randomness is the
optional ``torch.Generator``, so the same seed always yields the same masks.

``random_mask`` (an ablation, ``mask_type="random"``; not in the release) keeps the same number of
visible patches per row but picks them independently and uniformly, without the block structure.

Patches are indexed in TIME-MAJOR order: index = t * W + f for a grid of H time rows and W frequency
columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MASK_PROB", "MASK_LENGTH", "MASK_PROB_ADJUST", "MASK_TYPES", "MaskSpec", "num_visible",
           "num_block_centres", "block_marks", "inverse_block_mask", "random_mask", "check_mask_type"]

# EAT-base's masking (docs/reference.md section 3): the one source of these defaults
MASK_PROB = 0.8
MASK_LENGTH = 5
MASK_PROB_ADJUST = 0.07

# how the visible patches are chosen: the release's inverse blocks, or uniformly at random (ablation)
MASK_TYPES = ("inverse_block", "random")


def check_mask_type(mask_type: str) -> str:
    """``mask_type`` as a plain string if it is one of :data:`MASK_TYPES`, else a one-line ValueError."""
    if str(mask_type) not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    return str(mask_type)


@dataclass(frozen=True)
class MaskSpec:
    """How a pre-training batch is masked: the settings of the model that trains on the masks.

    Built from the model's config (:meth:`eat_fairseq.model.pretraining.PretrainConfig.mask_spec`), so
    the masks drawn in data-loader workers and those the model draws itself cannot disagree, and the
    patch grid always uses the encoder's patch size. ``mask_type="random"`` ignores ``mask_length``
    and ``mask_prob_adjust`` (they only shape the blocks).
    """

    clone_batch: int
    mask_prob: float
    mask_length: int
    mask_prob_adjust: float
    patch_size: int
    mask_type: str = "inverse_block"

    def __post_init__(self) -> None:
        # checked here too because data-loader workers build masks from a spec without the model
        object.__setattr__(self, "mask_type", check_mask_type(self.mask_type))

    def grid(self, num_frames: int, num_mel_bins: int) -> tuple[int, int]:
        """The ``(H, W)`` patch grid of a ``(num_frames, num_mel_bins)`` fbank."""
        return num_frames // self.patch_size, num_mel_bins // self.patch_size

    def blocks_per_row(self, grid: tuple[int, int]) -> int:
        """Visible blocks an inverse block mask places per row on ``grid`` (0 for random masks).

        0 means the "inverse block" mask is a uniformly random one: with 80% masking and blocks of 5,
        a 128-frame window (an 8 x 8 patch grid, 12 visible patches) gets int(64 * 0.27 / 25) = 0
        blocks, and :func:`inverse_block_mask` then draws exactly what :func:`random_mask` draws.
        """
        if self.mask_type == "random":
            return 0
        h, w = _check_grid(grid)
        return num_block_centres(h * w, self.mask_prob, self.mask_prob_adjust, self.mask_length)

    def draw(self, rows: int, grid: tuple[int, int], generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """``(rows, H*W)`` masks (True = masked) with these settings: inverse block or random."""
        if self.mask_type == "random":
            return random_mask(rows, grid, mask_prob=self.mask_prob, generator=generator, device=device)
        return inverse_block_mask(rows, grid, mask_prob=self.mask_prob, mask_length=self.mask_length,
                                  mask_prob_adjust=self.mask_prob_adjust, generator=generator, device=device)


def num_visible(num_patches: int, mask_prob: float) -> int:
    """Number of patches left visible per row: ``int(P * (1 - mask_prob))``.

    Evaluated with Python floats exactly like the release, so ``num_visible(512, 0.8) == 102``
    (``512 * (1 - 0.8)`` is 102.39999999999998, truncated to 102).
    """
    return int(num_patches * (1 - mask_prob))


def num_block_centres(num_patches: int, mask_prob: float, mask_prob_adjust: float, mask_length: int) -> int:
    """Number of block centres drawn per row: ``int(P * (1 - mask_prob + mask_prob_adjust) / L**2)``.

    ``mask_prob_adjust`` over-provisions the blocks because overlapping and edge-clamped blocks cover
    fewer than ``L**2`` patches each; the exact visible count is enforced afterwards.
    """
    return int(num_patches * (1 - mask_prob + mask_prob_adjust) / mask_length**2)


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if len(grid) != 2:
        raise ValueError(f"grid must be (H, W), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"grid dimensions must be positive, got {grid!r}")
    return h, w


def block_marks(
    batch_size: int,
    grid: tuple[int, int],
    num_centres: int,
    mask_length: int = MASK_LENGTH,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Union of ``mask_length x mask_length`` blocks around random centres, before any count fix.

    Centres are drawn uniformly over the P patches (duplicates allowed). Offsets run from
    ``-(L // 2)`` to ``L - 1 - L // 2`` (``-2..2`` for L = 5) along both axes and are clamped to the
    grid, so blocks touching an edge are truncated rather than wrapped.

    Returns a bool tensor ``(B, H*W)`` with True = marked (a "visible" mark in EAT's inverse masking).
    Exposed separately so the block structure can be tested before the exact-count fix.
    """
    h, w = _check_grid(grid)
    num_patches = h * w
    marks = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    if num_centres <= 0 or batch_size == 0:
        return marks
    centres = torch.randint(
        0, num_patches, (batch_size, num_centres), generator=generator, device=device
    )  # (B, n_c)
    rows, cols = centres // w, centres % w  # (B, n_c) each
    offsets = range(-(mask_length // 2), mask_length - mask_length // 2)
    for dt in offsets:
        r = (rows + dt).clamp_(0, h - 1)
        for df in offsets:
            c = (cols + df).clamp_(0, w - 1)
            marks.scatter_(1, r * w + c, True)
    return marks


def inverse_block_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_prob: float = MASK_PROB,
    mask_length: int = MASK_LENGTH,
    mask_prob_adjust: float = MASK_PROB_ADJUST,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """EAT's inverse block mask: ``(B, H*W)`` bool, True = masked.

    1. Mark ``num_block_centres(...)`` clamped blocks per row as visible (``block_marks``).
    2. Force exactly ``V = num_visible(P, mask_prob)`` visible patches per row: if a row has too many
       marks, a uniformly random subset of V marks is kept; if too few, uniformly random unmarked
       patches are added. Both cases are one vectorised top-k over random keys in which marked
       patches rank above unmarked ones (the same distribution as unmarking/marking at random).
    3. Invert: everything not visible is masked.

    ``device`` (an addition to the design signature) chooses where the mask is built; a generator, if
    given, must live on that device.
    """
    h, w = _check_grid(grid)
    num_patches = h * w
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    n_visible = num_visible(num_patches, mask_prob)
    n_centres = num_block_centres(num_patches, mask_prob, mask_prob_adjust, mask_length)
    marks = block_marks(batch_size, grid, n_centres, mask_length, generator=generator, device=device)

    # Marked patches get keys in [1, 2), unmarked in [0, 1): top-V keeps marked ones first, each
    # group in uniformly random order.
    keys = torch.rand(
        batch_size, num_patches, generator=generator, device=marks.device, dtype=torch.float64
    ) + marks.double()  # (B, P); float64 keeps ties among marked keys negligible
    keep = keys.topk(n_visible, dim=1, sorted=False).indices  # (B, V)
    visible = torch.zeros_like(marks).scatter_(1, keep, True)
    return ~visible


def random_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_prob: float = MASK_PROB,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random patch mask ``(B, H*W)`` bool, True = masked: the ablation of the block structure.

    Each row keeps exactly ``V = num_visible(P, mask_prob)`` visible patches, as
    :func:`inverse_block_mask` does, so the only difference between the two is WHICH patches stay
    visible (scattered here, contiguous blocks there) and the dense ``(B, V, D)`` gather still works.
    The V patches are a uniformly random subset per row (top-V of uniform keys); the only source of
    randomness is ``generator``, so a seed gives the same masks.
    """
    h, w = _check_grid(grid)
    num_patches = h * w
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    n_visible = num_visible(num_patches, mask_prob)
    keys = torch.rand(batch_size, num_patches, generator=generator, device=device, dtype=torch.float64)  # (B, P)
    keep = keys.topk(n_visible, dim=1, sorted=False).indices  # (B, V)
    visible = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=keys.device).scatter_(1, keep, True)
    return ~visible
