"""Eager PyTorch reference of attention over [prefix ; own keys]: the math the prefix attention
function (``dept_fast.hf.attention``) and any future fused prefix-attention kernel must give."""
from typing import Optional

import torch


def prefix_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor] = None, scaling: Optional[float] = None,
                               position_bias: Optional[torch.Tensor] = None, causal: bool = False,
                               prefix_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention of ``query`` over ``[prefix_key ; key]``, in fp32.

    Args:
        query: (b, heads, q, head_dim); key, value: (b, kv_heads, k, head_dim) (heads a multiple of kv_heads).
        prefix_key, prefix_value: (1 or b, kv_heads, p, head_dim).
        attention_mask: bool (b or 1, 1, q, k), True = attend, over the own keys only; None: all, or
            causal (query i sees own keys j <= i + k - q: causal aligned to the bottom-right corner of
            the own keys, so query i sees keys j <= i + p + k - q of [prefix ; own]) when ``causal``.
        scaling: score multiplier, default head_dim ** -0.5.
        position_bias: additive (1 or b, heads, q, k) over the own keys (T5); the prefix gets none.
        prefix_valid: (b, p) bool, the prefix slots each row attends to (a mixed batch's rows, prefixes
            of different lengths); None: every query attends to every prefix slot. A query that sees
            no key at all gets zeros.

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
    if prefix_valid is not None:
        scores[..., :n_prefix] = scores[..., :n_prefix].masked_fill(~prefix_valid[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ values).to(query.dtype).transpose(1, 2)
