"""Eager PyTorch references: the ground truth that tests and benchmarks both import.

Each function is the plain composition of PyTorch ops a user would write without dept_fast;
the fused kernels must match it numerically (see tests/) and are timed against it (see bench/).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def dept_embedding_reference(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             padding_idx: Optional[int] = None) -> torch.Tensor:
    """DePT embedding stage: ``[P ; E[ids] + scaling * (A @ B)[:L]]`` for every batch row.

    Args:
        input_ids: (b, L) token ids, L <= s.
        weight: (V, d) word embeddings E.
        prompt: (m, d) soft prompt P.
        lora_A: (s, r) and lora_B: (r, d), the position-wise low-rank update.
        scaling: lora_alpha / sqrt(r) (DePT authors' convention).
        padding_idx: as in ``nn.Embedding``, the row of E that receives no gradient.

    Returns:
        (b, m + L, d) in ``weight.dtype``; the update and prompt are cast to it before use,
        as the DePT authors' code does under mixed precision.
    """
    batch, seq_len = input_ids.shape
    embeds = F.embedding(input_ids, weight, padding_idx)
    if lora_A.shape[1] > 0:
        embeds = embeds + (scaling * (lora_A[:seq_len] @ lora_B)).to(embeds.dtype)
    return torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)


# --- HF integration (issue 3): the DePT stage with a position per token -------------------------

def dept_embedding_at_positions_reference(input_ids: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                                          prompt: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                          scaling: float, padding_idx: Optional[int] = None) -> torch.Tensor:
    """DePT embedding stage where each token takes the update row of its own position:
    ``out[i] = [P ; E[ids[i, t]] + scaling * (A @ B)[positions[i, t]]]``.

    With ``positions[i, t] = t`` this is :func:`dept_embedding_reference`. The HF integration uses it
    when a token's position differs from its column: left-padded rows (position = index among the
    row's real tokens) and generation steps after the first (position = tokens already seen).
    Pass a zero-row ``prompt`` (``prompt[:0]``) to embed tokens without prepending the prompt.

    Args:
        input_ids: (b, L) token ids.
        positions: (b, L) int64 rows of A, each in [0, s).
        weight, prompt, lora_A, lora_B, scaling, padding_idx: as in :func:`dept_embedding_reference`.

    Returns:
        (b, m + L, d) in ``weight.dtype``.
    """
    batch = input_ids.shape[0]
    embeds = F.embedding(input_ids, weight, padding_idx)
    if lora_A.shape[1] > 0:
        embeds = embeds + (scaling * (lora_A[positions] @ lora_B)).to(embeds.dtype)
    return torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)


# --- Prefix-Tuning (issue 7): the prefix MLP's tail and attention over [prefix ; own keys] ------

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


def prefix_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor] = None, scaling: Optional[float] = None,
                               position_bias: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """Softmax attention of ``query`` over ``[prefix_key ; key]``, in fp32.

    Args:
        query: (b, heads, q, head_dim); key, value: (b, kv_heads, k, head_dim) (heads a multiple of kv_heads).
        prefix_key, prefix_value: (1 or b, kv_heads, p, head_dim); every query attends to every prefix slot.
        attention_mask: bool (b or 1, 1, q, k), True = attend, over the own keys only; None: all, or
            causal (query i sees own keys j <= i + k - q) when ``causal``.
        scaling: score multiplier, default head_dim ** -0.5.
        position_bias: additive (1 or b, heads, q, k) over the own keys (T5); the prefix gets none.

    Returns:
        (b, q, heads, head_dim) in ``query.dtype`` (the layout transformers' attention functions return).
    """
    batch, heads, q_len, head_dim = query.shape
    n_prefix, own = prefix_key.shape[2], key.shape[2]
    keys = torch.cat([prefix_key.expand(batch, -1, -1, -1), key], dim=2).float()
    values = torch.cat([prefix_value.expand(batch, -1, -1, -1), value], dim=2).float()
    groups = heads // key.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = query.float() @ keys.transpose(-1, -2) * (head_dim ** -0.5 if scaling is None else scaling)
    if position_bias is not None:
        scores[..., n_prefix:] += position_bias.float()
    if attention_mask is None and causal:
        positions = torch.arange(own, device=query.device)
        attention_mask = positions <= torch.arange(q_len, device=query.device)[:, None] + own - q_len
    if attention_mask is not None:
        scores[..., n_prefix:] = scores[..., n_prefix:].masked_fill(~attention_mask, float("-inf"))
    return (scores.softmax(-1) @ values).to(query.dtype).transpose(1, 2)
