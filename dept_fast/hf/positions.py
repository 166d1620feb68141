"""Token positions, the one definition both adapters use.

A token's position ``pos`` is the caller's ``position_ids`` when given, else its index among its
row's real tokens, ``cumsum(attention_mask) - 1`` over the whole mask (cached tokens included), as
HF's ``generate()`` counts, else ``past + column``. So a left-padded row gives the numbers of the
row run alone, and generation step k of a row with n real tokens is at n + k. Padding slots get 0.
DePT takes update row ``pos`` and model position ``m + pos`` (shared prompt); Prefix-Tuning puts
tokens at ``p + pos``.
"""
from typing import Any, Dict, Optional

import torch

CACHE_KWARGS = ("cache", "past_key_values")
"""The generation cache's forward argument: ``cache`` from transformers 5.24, ``past_key_values`` before."""


def generation_cache(kwargs: Dict[str, Any]) -> Any:
    """The generation cache a forward's kwargs carry, under either name, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cached_length(kwargs: Dict[str, Any]) -> int:
    """Tokens already in the generation cache a forward's kwargs carry (0 without one)."""
    cache = generation_cache(kwargs)
    return 0 if cache is None else int(cache.get_seq_length())


def token_positions(batch: int, length: int, device: torch.device, attention_mask: Optional[torch.Tensor],
                    position_ids: Optional[torch.Tensor], past: int) -> torch.Tensor:
    """(batch, length) int64 positions of a pass's tokens (see the module docstring)."""
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch}, {length}) or (1, {length}), "
                             f"got {tuple(position_ids.shape)}")
        positions = position_ids.long().expand(batch, length)
    elif attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1)[:, -length:]
    else:
        positions = torch.arange(past, past + length, device=device).expand(batch, length)
    if attention_mask is not None:
        positions = positions.masked_fill(attention_mask[:, -length:] == 0, 0)
    return positions


def positions_are_columns(positions: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether every real token's position equals its column (one host sync; under torch.compile this
    answers False, which routes to the path that is correct for any positions)."""
    if torch.compiler.is_compiling():
        return False
    length = positions.shape[1]
    differs = positions != torch.arange(length, device=positions.device)
    if attention_mask is not None:
        differs &= attention_mask[:, -length:] != 0
    return not bool(differs.any())
