"""The model-family matrix every model-level test runs on, named once.

Four tiny models built from configs (tests/tiny_models.py): GPT-2 (learned positions, tied
embeddings), Llama with grouped-query attention, Qwen2 with multi-query attention (biased q/k/v,
untied embeddings) and T5 (encoder-decoder, relative positions). A test parametrizes over
:data:`FAMILIES` (everything), :data:`DECODERS` (the causal decoders) or a named subset of them,
and builds with :func:`build`.
"""
from typing import Any, Callable, Dict, Tuple

from torch import nn

from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_t5

FAMILIES: Dict[str, Callable[..., nn.Module]] = {
    "gpt2": tiny_gpt2, "llama-gqa": tiny_llama, "qwen2-mqa": tiny_qwen2, "t5": tiny_t5}
"""Family name -> builder ``(seed=0, **config_overrides)`` of the tiny model in eval mode."""

ENCODER_DECODERS = ("t5",)
DECODERS = {name: builder for name, builder in FAMILIES.items() if name not in ENCODER_DECODERS}

NO_DROPOUT: Dict[str, Dict[str, Any]] = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama-gqa": {}, "qwen2-mqa": {},
    "t5": dict(dropout_rate=0.0)}
"""Config overrides that switch each family's dropout off (train mode then computes what eval does)."""

LAYOUTS: Dict[str, Dict[str, Tuple[int, int, int]]] = {
    "gpt2": {"decoder": (2, 4, 10)}, "llama-gqa": {"decoder": (2, 2, 12)}, "qwen2-mqa": {"decoder": (2, 1, 8)},
    "t5": {"encoder": (2, 4, 10), "decoder": (2, 4, 10)}}
"""Per family and self-attention stack: (layers, kv_heads, head_dim), the shape of its per-layer prefixes."""


def build(family: str, seed: int = 0, dropout: bool = True, **overrides) -> nn.Module:
    """The family's tiny model (eval mode); ``dropout=False`` switches its dropout off."""
    if not dropout:
        overrides = {**NO_DROPOUT[family], **overrides}
    return FAMILIES[family](seed, **overrides)
