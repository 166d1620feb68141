"""The one place launchers allocate the tensors kernels write into.

Tests replace :func:`allocate` with a NaN-filling allocator ("poisoning") to prove that every
element of every output is written by a kernel and none is left as uninitialised memory.
"""
import torch


def allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised tensor that a kernel will overwrite completely."""
    return torch.empty(shape, dtype=dtype, device=device)
