"""Eager PyTorch reference of the prefix MLP's fused tail (tanh -> Linear -> attention layout): what
tests and benchmarks compare the kernels with, and the op's path where the kernels do not run."""
from typing import Sequence

import torch
import torch.nn.functional as F


def prefix_kv_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                        num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Every layer's prefix K/V from the prefix MLP's hidden layer: ``tanh(hidden) @ weight.T + bias``
    viewed (p, layers, 2, kv_heads, head_dim) and laid out as (layers, 2, kv_heads, p, head_dim).

    Args:
        hidden: (p, mid) output of the MLP's first Linear (before tanh).
        weight: (N, mid), bias: (N,), the second Linear; N = num_layers * 2 * num_kv_heads * head_dim
            in PEFT's ``prompt_embeddings`` column order (layer-major, key before value).

    Returns:
        (num_layers, 2, num_kv_heads, p, head_dim) in ``weight.dtype``; ``[l, 0]`` keys, ``[l, 1]`` values.
    """
    n_prefix = hidden.shape[0]
    out = F.linear(torch.tanh(hidden).to(weight.dtype), weight, bias.to(weight.dtype))
    return out.view(n_prefix, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def grouped_prefix_kv_reference(hidden: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                                num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """:func:`prefix_kv_reference` of every group g (``hidden[g]``, ``weights[g]``, ``biases[g]``), stacked:
    (G, num_layers, 2, num_kv_heads, p, head_dim) in the weights' dtype."""
    return torch.stack([prefix_kv_reference(h, w, b, num_layers, num_kv_heads, head_dim)
                        for h, w, b in zip(hidden.unbind(0), weights, biases)])
