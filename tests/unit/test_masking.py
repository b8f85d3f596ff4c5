"""Tests for eat_fairseq.model.masking (reference section 3)."""
from __future__ import annotations

import pytest
import torch

from eat_fairseq.model.masking import (
    block_marks,
    inverse_block_mask,
    num_block_centres,
    num_visible,
)

GRIDS = [(64, 8), (8, 8), (5, 8), (13, 8), (3, 5)]
SETTINGS = {"base": (0.8, 0.07), "large": (0.75, 0.1)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_num_visible_matches_python_float_truncation() -> None:
    assert num_visible(512, 0.8) == 102
    assert num_visible(512, 0.75) == 128
    assert num_visible(64, 0.8) == int(64 * (1 - 0.8))
    assert num_visible(15, 0.8) == 2  # 15 * (1 - 0.8) = 2.999999999999999, not 3
    for p in (15, 40, 64, 104, 512, 6144):
        for mp in (0.8, 0.75, 0.6, 0.5):
            assert num_visible(p, mp) == int(p * (1 - mp))


def test_num_block_centres_base_and_large() -> None:
    assert num_block_centres(512, 0.8, 0.07, 5) == 5  # 512 * 0.27 / 25 = 5.53
    assert num_block_centres(512, 0.75, 0.1, 5) == 7  # 512 * 0.35 / 25 = 7.17
    assert num_block_centres(15, 0.8, 0.07, 5) == 0


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_exact_visible_count_per_row(grid: tuple[int, int], setting: str) -> None:
    mask_prob, adjust = SETTINGS[setting]
    b = 64
    mask = inverse_block_mask(b, grid, mask_prob=mask_prob, mask_prob_adjust=adjust, generator=_gen(0))
    p = grid[0] * grid[1]
    assert mask.shape == (b, p)
    assert mask.dtype == torch.bool
    expected = int(p * (1 - mask_prob))
    assert ((~mask).sum(1) == expected).all()


def test_base_512_patches_gives_102_visible_410_masked() -> None:
    mask = inverse_block_mask(16, (64, 8), generator=_gen(1))
    assert ((~mask).sum(1) == 102).all()
    assert (mask.sum(1) == 410).all()


def test_block_marks_are_union_of_clamped_blocks() -> None:
    h, w, length = 13, 8, 5
    marks = block_marks(32, (h, w), num_centres=3, mask_length=length, generator=_gen(2))
    # Recompute the same centres with the same generator stream and build blocks by hand.
    centres = torch.randint(0, h * w, (32, 3), generator=_gen(2))
    for row in range(32):
        expected = torch.zeros(h, w, dtype=torch.bool)
        for c in centres[row].tolist():
            t, f = divmod(c, w)
            expected[max(t - 2, 0) : min(t + 2, h - 1) + 1, max(f - 2, 0) : min(f + 2, w - 1) + 1] = True
        assert torch.equal(marks[row].view(h, w), expected)


def test_block_marks_corner_block_is_clamped() -> None:
    # A 1 x 1 grid forces the centre to 0; every offset clamps back onto it.
    marks = block_marks(4, (1, 1), num_centres=2, mask_length=5, generator=_gen(3))
    assert marks.all()
    # On a 3 x 5 grid a single centre at any position covers a clamped rectangle, never more than
    # the grid and never wrapping across a row boundary.
    marks = block_marks(200, (3, 5), num_centres=1, mask_length=3, generator=_gen(4))
    grid_marks = marks.view(200, 3, 5)
    for row in grid_marks:
        ts = row.any(1).nonzero().flatten()
        fs = row.any(0).nonzero().flatten()
        block = torch.zeros(3, 5, dtype=torch.bool)
        block[ts.min() : ts.max() + 1, fs.min() : fs.max() + 1] = True
        assert torch.equal(row, block)  # a solid rectangle
        assert 2 <= len(ts) <= 3 and 2 <= len(fs) <= 3


def test_even_mask_length_offsets() -> None:
    # L = 4 uses offsets -2..1: a centre in the grid interior covers rows t-2..t+1.
    h, w = 20, 20
    marks = block_marks(50, (h, w), num_centres=1, mask_length=4, generator=_gen(5))
    centres = torch.randint(0, h * w, (50, 1), generator=_gen(5))
    for row, c in zip(marks.view(50, h, w), centres[:, 0].tolist()):
        t, f = divmod(c, w)
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[max(t - 2, 0) : min(t + 1, h - 1) + 1, max(f - 2, 0) : min(f + 1, w - 1) + 1] = True
        assert torch.equal(row, expected)


def test_visible_set_lies_within_marks_when_marks_exceed_target() -> None:
    # With a large adjust there are more marks than visible slots: the visible set must be a subset
    # of the pre-fix marks (extras are unmarked, nothing new is marked).
    b, grid = 64, (64, 8)
    mask_prob, adjust = 0.8, 0.5
    n_c = num_block_centres(512, mask_prob, adjust, 5)
    marks = block_marks(b, grid, n_c, 5, generator=_gen(6))
    mask = inverse_block_mask(b, grid, mask_prob=mask_prob, mask_prob_adjust=adjust, generator=_gen(6))
    visible = ~mask
    assert (marks.sum(1) >= 102).all()
    assert not (visible & ~marks).any()


def test_marks_kept_when_fewer_than_target() -> None:
    # With a negative adjust there are fewer marks than visible slots: all marks stay visible and
    # random extra patches are added.
    b, grid = 64, (64, 8)
    mask_prob, adjust = 0.8, -0.1
    n_c = num_block_centres(512, mask_prob, adjust, 5)
    assert n_c == 2  # at most 50 marks < 102
    marks = block_marks(b, grid, n_c, 5, generator=_gen(7))
    mask = inverse_block_mask(b, grid, mask_prob=mask_prob, mask_prob_adjust=adjust, generator=_gen(7))
    visible = ~mask
    assert (marks.sum(1) < 102).all()
    assert not (marks & ~visible).any()
    assert ((visible & ~marks).sum(1) == 102 - marks.sum(1)).all()


def test_default_base_masks_are_mostly_blocks() -> None:
    # Default settings: the visible patches come (almost entirely) from the blocks, so they are far
    # more clustered than a uniform random choice. Measure the share of visible patches with a
    # visible time-neighbour.
    mask = inverse_block_mask(64, (64, 8), generator=_gen(8)).view(64, 64, 8)
    vis = ~mask
    neighbour = torch.zeros_like(vis)
    neighbour[:, 1:] |= vis[:, :-1]
    neighbour[:, :-1] |= vis[:, 1:]
    share = (vis & neighbour).sum() / vis.sum()
    assert share > 0.8  # uniform random 20% would give about 0.36


def test_same_seed_same_mask_different_seed_different() -> None:
    a = inverse_block_mask(8, (64, 8), generator=_gen(123))
    b = inverse_block_mask(8, (64, 8), generator=_gen(123))
    c = inverse_block_mask(8, (64, 8), generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rows_differ_within_batch() -> None:
    mask = inverse_block_mask(16, (64, 8), generator=_gen(9))
    assert len({tuple(r.tolist()) for r in mask}) == 16


def test_visible_patches_cover_grid_uniformly_in_expectation() -> None:
    # Every patch, edges included, must be visible sometimes; the clamping makes edges slightly more
    # likely, never impossible.
    mask = inverse_block_mask(4000, (8, 8), generator=_gen(10))
    freq = (~mask).float().mean(0)
    assert (freq > 0.05).all()
    assert abs(freq.mean().item() - num_visible(64, 0.8) / 64) < 1e-6


def test_no_centres_still_exact_count() -> None:
    mask = inverse_block_mask(32, (3, 5), generator=_gen(11))
    assert ((~mask).sum(1) == 2).all()  # int(15 * (1 - 0.8)) == 2


def test_full_and_empty_mask_prob() -> None:
    assert inverse_block_mask(4, (4, 8), mask_prob=1.0, generator=_gen(12)).all()
    assert not inverse_block_mask(4, (4, 8), mask_prob=0.0, generator=_gen(12)).any()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        inverse_block_mask(2, (0, 8))
    with pytest.raises(ValueError):
        inverse_block_mask(2, (4, 8), mask_prob=1.5)
