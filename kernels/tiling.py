"""Launch configuration (tile sizes, batch groups) shared by the DePT kernels.

The grid is (position blocks, feature blocks, batch groups). Each program owns one
(BLOCK_T x BLOCK_D) tile of positions x features and streams the batch rows of its group
through it, so the A.B tile (forward) or the batch reduction (backward) is done once per tile,
not once per row. Batch groups only exist to give the GPU enough programs when the tile count
alone would leave SMs idle; each extra group re-computes one A.B tile (forward) or adds one
fp32 partial-sum slab (backward).
"""
from typing import NamedTuple

import torch
import triton

# Programs per SM we aim for: enough resident CTAs to keep loads in flight on a
# bandwidth-bound kernel. Untuned guess until measured on a GPU (see bench/RESULTS.md).
_PROGRAMS_PER_SM = 4


class TileConfig(NamedTuple):
    """Tile sizes and batch split of one DePT launch (a NamedTuple: torch.compile traces it)."""

    block_t: int
    block_d: int
    groups: int
    num_warps: int = 4

    def rows_per_group(self, batch: int) -> int:
        return triton.cdiv(batch, self.groups) if batch else 0


def rank_block(rank: int) -> int:
    """Rank padded for ``tl.dot``: a power of two, at least 16 (the GPU's minimum K)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_tiles(batch: int, n_positions: int, dim: int, element_size: int,
                 device: torch.device, max_groups: int = None) -> TileConfig:
    """Pick a :class:`TileConfig` for ``batch`` rows of ``n_positions`` x ``dim`` elements.

    ``max_groups`` caps the batch split (the backward passes one so that its fp32 partial sums
    stay a small fraction of the gradient it reads). On CPU tensors (the Triton interpreter) each
    program costs ~1 ms regardless of its size, so tiles are as wide as possible and the batch is
    never split.
    """
    if device.type != "cuda":
        return TileConfig(block_t=16, block_d=min(256, max(16, triton.next_power_of_2(dim))), groups=1)
    # 512 bytes of a row per load: 128 fp32 or 256 fp16/bf16 elements.
    block_d = min(512 // element_size, max(16, triton.next_power_of_2(dim)))
    block_t = 16
    tiles = triton.cdiv(max(n_positions, 1), block_t) * triton.cdiv(dim, block_d)
    wanted = _PROGRAMS_PER_SM * _sm_count(device)
    groups = max(1, min(batch, triton.cdiv(wanted, tiles), max_groups or batch))
    return TileConfig(block_t=block_t, block_d=block_d, groups=groups)
