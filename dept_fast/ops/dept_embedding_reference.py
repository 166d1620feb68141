"""Eager PyTorch reference of the DePT embedding stage: the ground truth that tests and benchmarks
import, and the op's path where the Triton kernels do not run (plain CPU tensors)."""
from typing import Optional

import torch
import torch.nn.functional as F


def dept_embedding_reference(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             padding_idx: Optional[int] = None) -> torch.Tensor:
    """DePT embedding stage: ``[P ; E[ids] + scaling * (A @ B)[:L]]`` for every batch row, as a user
    would write it without dept_fast.

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


def dept_embedding_mixed_reference(input_ids: torch.Tensor, adapter_index: torch.Tensor, weight: torch.Tensor,
                                   prompts: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                   scaling: torch.Tensor, positions: Optional[torch.Tensor] = None,
                                   padding_idx: Optional[int] = None) -> torch.Tensor:
    """The DePT stage with an adapter per batch row, from packed adapters:
    ``out[i] = [prompts[a] ; E[ids[i]] + scaling[a] * (lora_A[a] @ lora_B[a])[positions[i]]]``, a = adapter_index[i].

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

    Returns:
        (b, M + L, d) in ``weight.dtype``: the update is computed in fp32 and rounded once, with E's row.
    """
    batch, seq_len = input_ids.shape
    embeds = F.embedding(input_ids, weight, padding_idx)
    if lora_A.shape[2] > 0:
        if positions is None:
            positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        rows = lora_A[adapter_index[:, None], positions].float()  # (b, L, R)
        update = scaling.float()[adapter_index, None, None] * torch.bmm(rows, lora_B[adapter_index].float())
        embeds = (embeds.float() + update).to(weight.dtype)
    return torch.cat([prompts[adapter_index].to(weight.dtype), embeds], dim=1)
