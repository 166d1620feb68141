"""Eager PyTorch reference of the DePT embedding stage: the ground truth that tests and benchmarks
import, and the op's path where the Triton kernels do not run (plain CPU tensors, ``meta`` tensors).

Precision, the same as the kernels': the row of E is upcast to fp32, multiplied by ``embed_scale``, the
update ``scaling * (A.float() @ B.float())`` added in fp32, and the sum rounded once to E's dtype;
the prompt is cast to E's dtype. So a row's numbers depend neither on the adapter's dtype nor on
the path (fused kernel, per-position, mixed batch) that computed it. (fp64 inputs, which only tests
pass, are computed in fp64: "fp32" is "at least fp32".)
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _accumulator(weight: torch.Tensor) -> torch.dtype:
    """The dtype the stage computes in for word embeddings ``weight``: fp32 (fp64 for fp64)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _scaled_rows(embeds: torch.Tensor, embed_scale: float, update: Optional[torch.Tensor]) -> torch.Tensor:
    """``embed_scale * embeds + update`` computed in fp32 and rounded once to ``embeds.dtype`` (E's);
    ``update`` (fp32, broadcast against ``embeds``) None for no update. ``embeds`` itself, untouched,
    when there is nothing to scale or add."""
    if update is None and embed_scale == 1.0:
        return embeds
    rows = embeds.to(_accumulator(embeds))
    if embed_scale != 1.0:
        rows = rows * embed_scale
    if update is not None:
        rows = rows + update
    return rows.to(embeds.dtype)


def dept_embedding_reference(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             padding_idx: Optional[int] = None, *, embed_scale: float = 1.0) -> torch.Tensor:
    """DePT embedding stage: ``[P ; embed_scale * E[ids] + scaling * (A @ B)[:L]]`` for every batch row,
    as a user would write it without dept_fast.

    Args:
        input_ids: (b, L) token ids, L <= s.
        weight: (V, d) word embeddings E.
        prompt: (m, d) soft prompt P.
        lora_A: (s, r) and lora_B: (r, d), the position-wise low-rank update.
        scaling: lora_alpha / sqrt(r) (DePT authors' convention).
        padding_idx: as in ``nn.Embedding``, the row of E that receives no gradient.
        embed_scale: what the model's embedding module multiplies E's rows by (1 for a plain
            ``nn.Embedding``; sqrt(d) for Gemma, BART with ``scale_embedding``).

    Returns:
        (b, m + L, d) in ``weight.dtype``: each token's row computed in fp32 and rounded once (see
        the module docstring), the prompt cast to E's dtype.
    """
    batch, seq_len = input_ids.shape
    update = None
    if lora_A.shape[1] > 0:
        acc = _accumulator(weight)
        update = scaling * (lora_A[:seq_len].to(acc) @ lora_B.to(acc))
    embeds = _scaled_rows(F.embedding(input_ids, weight, padding_idx), embed_scale, update)
    return torch.cat([prompt.to(weight.dtype).expand(batch, -1, -1), embeds], dim=1)


def dept_embedding_mixed_reference(input_ids: torch.Tensor, adapter_index: torch.Tensor, weight: torch.Tensor,
                                   prompts: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                   scaling: torch.Tensor, positions: Optional[torch.Tensor] = None,
                                   padding_idx: Optional[int] = None, *, embed_scale: float = 1.0,
                                   embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DePT stage with an adapter per batch row, from packed adapters:
    ``out[i] = [prompts[a] ; embed_scale * E[ids[i]] + scaling[a] * (lora_A[a] @ lora_B[a])[positions[i]]]``,
    a = adapter_index[i].

    Args:
        input_ids: (b, L) token ids.
        adapter_index: (b,) int64, each row's adapter in [0, k).
        weight: (V, d) word embeddings E.
        prompts: (k, M, d), each adapter's prompt left-padded (with zeros) to the longest, M.
        lora_A: (k, S, R) and lora_B: (k, R, d), zero-padded to the largest max_length S and rank R
            (zero rows and columns add exact zeros).
        scaling: (k,) float32, each adapter's lora_alpha / sqrt(r).
        positions: (b, L) rows of A; None: each token's column.
        padding_idx: as in ``nn.Embedding``.
        embed_scale: the multiplier of E's rows, one for every adapter (they share E); see
            :func:`dept_embedding_reference`.
        embeds: (b, L, d) the token rows as the model's embedding module computed them (one with
            parameters of its own, e.g. a LoRA-wrapped embedding), in place of ``embed_scale * E[ids]``.

    Returns:
        (b, M + L, d) in ``weight.dtype``, each token's row computed in fp32 and rounded once.
    """
    batch, seq_len = input_ids.shape
    update = None
    if lora_A.shape[2] > 0:
        if positions is None:
            positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        acc = _accumulator(weight)
        rows = lora_A[adapter_index[:, None], positions].to(acc)  # (b, L, R)
        update = scaling.to(acc)[adapter_index, None, None] * torch.bmm(rows, lora_B[adapter_index].to(acc))
    if embeds is None:
        embeds = _scaled_rows(F.embedding(input_ids, weight, padding_idx), embed_scale, update)
    else:
        embeds = _scaled_rows(embeds.to(weight.dtype), 1.0, update)
    return torch.cat([prompts[adapter_index].to(weight.dtype), embeds], dim=1)
