"""The GPU launch heuristic, checked without a GPU (SM count stubbed to an H100's 132)."""
import pytest
import torch
import triton

from dept_fast.kernels import tiling

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def h100_sm_count(monkeypatch):
    monkeypatch.setattr(tiling, "_sm_count", lambda device: 132)


@pytest.mark.parametrize("batch, n_pos, dim, elem", [(64, 572, 4096, 2), (8, 2108, 4096, 2), (32, 316, 768, 4),
                                                     (32, 316, 768, 2), (1, 20, 40, 4)])
def test_enough_programs_without_oversplitting(batch, n_pos, dim, elem):
    cfg = tiling.choose_tiles(batch, n_pos, dim, elem, CUDA)
    tiles = triton.cdiv(n_pos, cfg.block_t) * triton.cdiv(dim, cfg.block_d)
    assert cfg.block_d * elem <= 512 and cfg.block_d >= 16 and cfg.block_t >= 16  # tl.dot needs >= 16
    assert 1 <= cfg.groups <= batch
    if cfg.groups > 1:  # split only when the tiles alone leave SMs idle, and not further than needed
        assert (cfg.groups - 1) * tiles < tiling._PROGRAMS_PER_SM * 132
    assert cfg.rows_per_group(batch) * cfg.groups >= batch


def test_max_groups_caps_the_split():
    assert tiling.choose_tiles(32, 316, 768, 4, CUDA).groups > 2
    assert tiling.choose_tiles(32, 316, 768, 4, CUDA, max_groups=2).groups == 2


def test_interpreter_never_splits_and_uses_wide_tiles():
    cfg = tiling.choose_tiles(64, 572, 40, 4, torch.device("cpu"))
    assert cfg.groups == 1 and cfg.block_d == 64


@pytest.mark.parametrize("rank, block", [(0, 16), (1, 16), (16, 16), (17, 32), (30, 32), (64, 64)])
def test_rank_padded_for_tl_dot(rank, block):
    assert tiling.rank_block(rank) == block
