"""Token positions, the one definition both adapters use.

A token's position ``pos`` is the caller's ``position_ids`` when given, else its index among its
row's real tokens, ``cumsum(attention_mask) - 1`` over the whole mask (cached tokens included), as
HF's ``generate()`` counts, else ``past + column``. So a left-padded row gives the numbers of the
row run alone, and generation step k of a row with n real tokens is at n + k. Padding slots get 0.
DePT takes update row ``pos`` and model position ``m + pos`` (shared prompt); Prefix-Tuning puts
tokens at ``p + pos``.
"""
import inspect
from contextvars import ContextVar
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

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


# ---------------------------------------------------------------------------------------------
# The "cache" position convention of an encoder-decoder's decoder (PEFT's prefixes)

_decoder_offset: ContextVar[Optional[int]] = ContextVar("dept_fast_decoder_position_offset", default=None)
"""During one decoder pass under the "cache" convention: how far its tokens' positions move (p).
Set by the decoder stack's pre-hook, reset by its forward hook (which runs even when the forward
raises); per thread and task, never on a module."""


def positions_module(stack: nn.Module, attention_layers: Sequence[nn.Module]) -> Optional[nn.Module]:
    """The one submodule of ``stack`` outside its attention layers whose forward takes
    ``position_ids`` (BART's ``embed_positions``: the decoder computes ``position_ids`` itself, from
    the cache's length, and hands them to it), or None where there is none or more than one."""
    attention = {id(layer) for layer in attention_layers}
    candidates = [m for m in stack.modules() if m is not stack
                  and "position_ids" in inspect.signature(m.forward).parameters
                  and not any(id(x) in attention for x in m.modules())]  # neither an attention layer nor above one
    outermost = [m for m in candidates if not any(o is not m and any(x is m for x in o.modules()) for o in candidates)]
    return outermost[0] if len(outermost) == 1 else None


def set_decoder_offset(offset: Optional[int]) -> None:
    """Move the positions of this thread's next decoder pass by ``offset`` (None: not at all); the
    stack's forward hook :class:`EndDecoderOffset` undoes it."""
    _decoder_offset.set(offset)


class EndDecoderOffset:
    """Forward hook of the decoder stack (``always_call``): the pass is over, positions are not moved."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        if not torch.compiler.is_compiling():  # never set under compile (see StackPrefixes)
            _decoder_offset.set(None)


class ShiftPositions:
    """Forward pre-hook of the positions module (:func:`positions_module`): ``position_ids`` + the
    offset of this decoder pass, if any."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(module.forward)

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[Tuple[tuple, dict]]:
        # Dynamo cannot trace ContextVar.get; under compile no offset is set (StackPrefixes refuses)
        offset = None if torch.compiler.is_compiling() else _decoder_offset.get()
        if not offset:
            return None
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        if bound.get("position_ids") is None:
            raise RuntimeError(f"{type(module).__name__} was called without position_ids, so the decoder's tokens "
                               "cannot be placed after the prefix (the 'cache' position convention)")
        return (), {**bound, "position_ids": bound["position_ids"] + offset}
