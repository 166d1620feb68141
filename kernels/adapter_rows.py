"""Which adapter each batch row takes, in the form the DePT kernels read, and the kernels' two helpers on it.

The kernels serve one adapter (2-D prompt (m, d), lora_A (s, r), lora_B (r, d), a float scaling) or
k adapters packed into 3-D tensors (prompts (k, M, d), lora_A (k, S, R), lora_B (k, R, d), a (k,)
fp32 scaling; see ``dept_fast.ops.pack_adapters``) with an adapter per row. For the latter the rows
are visited sorted by adapter (:func:`sort_rows`), so each adapter's rows form one run of
consecutive positions. Grid axis 2 of both kernels enumerates *segments*: each adapter's run split
into the same number of groups (one adapter: the batch split into groups), so a program streams rows
of one adapter only: the forward computes that adapter's update tile once per segment, the backward
sums that adapter's rows without atomics.
"""
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl


class AdapterRows(NamedTuple):
    """Each batch row's adapter, and the rows sorted by it (stable: rows of one adapter keep their order).

    ``index`` (b,) int64: row i's adapter, in [0, k); ``order`` (b,) int64: the batch rows, sorted by
    adapter (the order the kernels visit them in); ``runs`` (k + 1,) int64: adapter a's rows are
    ``order[runs[a]:runs[a + 1]]`` (an empty run for an adapter no row takes)."""

    index: torch.Tensor
    order: torch.Tensor
    runs: torch.Tensor


def sort_rows(index: torch.Tensor, adapters: int) -> AdapterRows:
    """:class:`AdapterRows` of ``index`` (b,) int64 in [0, adapters), computed on its device without a
    host synchronisation (a stable sort and a search of the sorted index)."""
    sorted_index, order = torch.sort(index, stable=True)
    return AdapterRows(index, order, torch.searchsorted(sorted_index, torch.arange(adapters + 1, device=index.device)))


def as_packs(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """One adapter's 2-D tensors as packs of one (views); packed 3-D tensors unchanged."""
    return tuple(t if t.dim() == 3 else t[None] for t in tensors)


def scaling_of_packs(scaling):
    """The scaling that multiplies (k, ., .) products: a float as it is, a (k,) tensor as (k, 1, 1)."""
    return scaling[:, None, None] if isinstance(scaling, torch.Tensor) else scaling


@triton.jit
def _batch_row(order_ptr, i, INDEXED: tl.constexpr):
    """The batch row visited i-th (int64): ``order[i]`` when rows are sorted by adapter, else i."""
    row = tl.cast(i, tl.int64)
    if INDEXED:
        row = tl.load(order_ptr + i)
    return row


@triton.jit
def _segment_rows(runs_ptr, segment, groups, batch, INDEXED: tl.constexpr):
    """The visited positions [start, end) that program ``segment`` (grid axis 2) streams: group
    ``segment % groups`` of adapter ``segment // groups``'s rows, or of every row with one adapter."""
    lo = 0
    hi = batch
    if INDEXED:
        lo = tl.load(runs_ptr + segment // groups).to(tl.int32)
        hi = tl.load(runs_ptr + segment // groups + 1).to(tl.int32)
    per_group = tl.cdiv(hi - lo, groups)
    start = lo + (segment % groups) * per_group
    return start, tl.minimum(start + per_group, hi)
