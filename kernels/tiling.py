"""Launch plans shared by the kernels, and the one place a launcher starts a kernel.

A *plan* is decided from shapes alone (plus the GPU's SM count, ``None`` for the interpreter): the
grid and the launch's keyword arguments (constexprs, ``num_warps``). Launchers compute their plan
and hand it to :func:`launch`; :func:`dry_run` makes :func:`launch` record instead of run, so a
compile check can call the real launchers on ``meta`` tensors and compile exactly what they would
launch on a GPU with that many SMs (``tests/kernel_compile.py``).

DePT grids are (position blocks, feature blocks, segments). Each program owns one
(BLOCK_T x BLOCK_D) tile of positions x features and streams the batch rows of its segment
through it, so the A.B tile (forward) or the batch reduction (backward) is done once per tile,
not once per row. With one adapter the segments are batch groups; with k packed adapters, one per
row, each adapter's rows are split into the same number of groups (``adapter_rows``), k x groups
segments. Groups only exist to give the GPU enough programs when the tiles (x k) alone would
leave SMs idle; each extra group re-computes one A.B tile (forward) or adds one fp32 partial-sum
slab (backward).
"""
import contextlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton

# Programs per SM we aim for: enough resident CTAs to keep loads in flight on a
# bandwidth-bound kernel. Untuned guess until measured on a GPU (see bench/RESULTS.md).
_PROGRAMS_PER_SM = 4
# Bytes of one tile row a DePT program loads per batch row: 4 x 16-byte vectors per thread.
_ROW_BYTES_PER_THREAD = 64
# Batch rows the DePT backward keeps in flight: tl.range(num_stages=_BWD_STAGES) issues row
# i + _BWD_STAGES - 1 (cp.async into shared memory) while it adds row i, so each thread always has
# (_BWD_STAGES - 2) x 4 to (_BWD_STAGES - 1) x 4 of its 16-byte loads in flight: 8 to 12.
_BWD_STAGES = 4


class Plan(NamedTuple):
    """One kernel launch decided from shapes: grid and the launch's keyword arguments."""

    grid: Tuple[int, int, int]
    meta: Dict[str, object]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class KernelLaunch(NamedTuple):
    """What :func:`launch` was asked to start (recorded under :func:`dry_run`)."""

    kernel: Callable
    plan: Plan
    args: tuple


_recorder: Optional[Tuple[int, List[KernelLaunch]]] = None


def _sm_count(device: torch.device) -> Optional[int]:
    """SMs the plans size grids for: the dry run's count, the CUDA device's, or None (CPU tensors, which
    only reach the kernels under the Triton interpreter)."""
    if _recorder is not None:
        return _recorder[0]
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(kernel, plan: Plan, *args) -> None:
    """Start ``kernel`` on ``plan.grid`` with positional ``args`` (or record it under :func:`dry_run`)."""
    if _recorder is not None:
        _recorder[1].append(KernelLaunch(kernel, plan, args))
        return
    kernel[plan.grid](*args, **plan.meta)


@contextlib.contextmanager
def dry_run(sm_count: int) -> Iterator[List[KernelLaunch]]:
    """Inside, launchers plan for a GPU with ``sm_count`` SMs whatever their tensors' device (use ``meta``
    tensors) and :func:`launch` appends to the yielded list instead of running anything."""
    global _recorder
    previous, _recorder = _recorder, (sm_count, [])
    try:
        yield _recorder[1]
    finally:
        _recorder = previous


class TileConfig(NamedTuple):
    """Tile sizes and batch split of one DePT launch (a NamedTuple: torch.compile traces it)."""

    block_t: int
    block_d: int
    groups: int
    num_warps: int = 4


def rank_block(rank: int) -> int:
    """Rank padded for ``tl.dot``: a power of two, at least 16 (the GPU's minimum K)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def choose_tiles(batch: int, n_positions: int, dim: int, element_size: int,
                 sm_count: Optional[int], max_groups: Optional[int] = None, runs: int = 1) -> TileConfig:
    """Pick a :class:`TileConfig` for ``batch`` rows of ``n_positions`` x ``dim`` elements, each tile
    launched ``runs`` x groups times (``runs``: k packed adapters, each tile runs once per adapter's rows).

    ``sm_count`` None (the interpreter, ~1 ms per program regardless of its size): tiles as wide as
    possible, the batch never split. On the GPU a tile row is 512 bytes (each of 4 warps' threads
    loads 4 x 16 bytes of every batch row), narrowed down to 128 bytes while even the largest batch
    split (``max_groups``, which the backward passes so that its fp32 partial sums stay a small
    fraction of the gradient it reads) would leave SMs without a program; then the batch is split
    into groups until there are ``_PROGRAMS_PER_SM`` programs per SM. A grid below the SM count
    remains only where the shape has fewer (16 x 128-byte tiles) x batch rows than SMs, e.g. the
    launch-bound benchmark shape (b 2, m + L 40, d 128): its whole output is 20 KB.
    """
    if sm_count is None:
        return TileConfig(block_t=16, block_d=min(256, max(16, triton.next_power_of_2(dim))), groups=1)
    max_groups = min(batch, max_groups or batch) or 1
    block_t = 16
    block_d = min(512 // element_size, max(16, triton.next_power_of_2(dim)))

    def tiles(block_d: int) -> int:
        return triton.cdiv(max(n_positions, 1), block_t) * triton.cdiv(dim, block_d)

    while tiles(block_d) * runs * max_groups < sm_count and block_d * element_size > 128 and block_d > 16:
        block_d //= 2
    num_warps = max(1, block_t * block_d * element_size // (32 * _ROW_BYTES_PER_THREAD))
    groups = max(1, min(max_groups, triton.cdiv(_PROGRAMS_PER_SM * sm_count, tiles(block_d) * runs)))
    return TileConfig(block_t=block_t, block_d=block_d, groups=groups, num_warps=num_warps)
