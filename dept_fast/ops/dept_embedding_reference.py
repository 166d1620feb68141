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
