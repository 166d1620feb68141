"""DePT models and inputs the model-level tests share: the adapter sizes, the prompt's two routes
over the family matrix (tests/families.py), a model whose update is non-zero, padded batches."""
from typing import Optional, Sequence

import pytest
import torch
from torch import nn

from dept_fast import apply_dept
from families import DECODERS, FAMILIES, build
from tiny_models import VOCAB

M, R, S = 3, 4, 16
"""Prompt tokens m, rank r and max_length s of the tests' adapters."""

ROUTES = pytest.mark.parametrize("share", [None, False], ids=["shared", "every-row"])
"""share_prompt: None shares the prompt in causal decoders (T5: in every row), False never does."""

FAMILY_ROUTES = pytest.mark.parametrize("family, share", [
    pytest.param(family, share, id=f"{family}-{'shared' if share is None else 'every-row'}")
    for family in DECODERS for share in (None, False)] + [
    pytest.param(family, None, id=family) for family in FAMILIES if family not in DECODERS])
"""Every family under each route it has (T5 has one: the prompt in every encoder row)."""


def dept_model(family: str, rank: int = R, share: Optional[bool] = None, dropout: bool = True,
               **overrides) -> nn.Module:
    """``apply_dept`` on the family's tiny model (config ``overrides``) with a non-zero update (B is
    zero at initialisation); ``generate()`` then runs exactly ``max_new_tokens`` steps in every row."""
    model = apply_dept(build(family, dropout=dropout, **overrides), M, rank, S, share_prompt=share)
    model.generation_config.eos_token_id = None
    if rank:
        with torch.no_grad():
            model.dept.lora_B.normal_()
    return model


def padded_batch(lengths: Sequence[int], width: int, side: str):
    """Random ids (pad id 0 outside each row's real tokens) and the matching mask; ``side`` is
    "left" or "right"."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.randint(3, VOCAB, (n,))
        mask[row, cols] = 1
    return ids, mask


def randomized(module: nn.Module, seed: int = 11, std: float = 0.5) -> nn.Module:
    """Every trainable tensor of ``module`` drawn afresh from N(0, std^2) (an adapter's B is zero and
    its prompt E's rows at initialisation, which would hide mistakes); returns ``module``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return module
