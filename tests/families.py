"""The model-family matrix: every family users fine-tune, and what each adapter route must give on it.

:data:`MATRIX` holds twenty-one families built from tiny configs (tests/tiny_models.py), each with the
contract of every route: ``"exact"`` (equal to a reference built from the plain model, see
tests/family_references.py), ``"every-row"`` (DePT's default route falls back to the prompt in every
row, which must be exact) or ``"refused: <regex>"`` (attaching raises a ValueError/TypeError whose
message matches). tests/test_family_matrix.py runs every DePT route, Prefix-Tuning, the mixed batch
and generate across it.

:data:`FAMILIES` is the matrix's core, four families with different traits (GPT-2: learned positions,
tied embeddings; Llama: grouped-query attention; Qwen2: multi-query attention, biased q/k/v, untied
embeddings; T5: encoder-decoder, relative positions), on which the deeper behaviour tests
(checkpointing, threads, engines, checkpoints, PEFT parity) run; a test parametrizes over
:data:`FAMILIES`, :data:`DECODERS` (its causal decoders) or a named subset, and builds with :func:`build`.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

from torch import nn

import tiny_models as tiny

EXACT, EVERY_ROW = "exact", "every-row"
LEGACY_ATTENTION = "refused: does not route its attention through transformers' AttentionInterface"
SCALE_OUTSIDE = ("refused: does not give the plain model's outputs when fed its own embedding module's output "
                 "as inputs_embeds")
PREFIX_NO_POSITIONS = "refused: takes no position_ids"
MIXED_NO_POSITIONS = "refused: takes no position_ids, so in a batch whose rows' prompts differ in length"


@dataclass(frozen=True)
class Family:
    """One family of the matrix: its builder, whether it is an encoder-decoder, the config overrides
    that switch its dropout off, and the contract of each route (see the module docstring)."""

    builder: Callable[..., nn.Module]
    encoder_decoder: bool = False
    no_dropout: Dict[str, Any] = field(default_factory=dict)
    dept_shared: str = EXACT
    """DePT with ``share_prompt=None`` (shared in causal decoders where exact; T5-like: every row)."""
    dept_every_row: str = EXACT
    prefix: str = EXACT
    mixed: str = EXACT
    """A mixed batch whose rows' prompts differ in length (refused at the call where it cannot be exact)."""

    def outcome(self, route: str) -> str:
        return {"dept-shared": self.dept_shared, "dept-every-row": self.dept_every_row, "prefix": self.prefix}[route]


_ROTARY_DROPOUT = dict(attention_dropout=0.0)
_BART_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
MATRIX: Dict[str, Family] = {
    "gpt2": Family(tiny.tiny_gpt2, no_dropout=dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama-gqa": Family(tiny.tiny_llama, no_dropout=_ROTARY_DROPOUT),
    "qwen2-mqa": Family(tiny.tiny_qwen2, no_dropout=_ROTARY_DROPOUT),
    # window 16 < m + max_length: the shared prompt would leave the window, the prompt goes in every row
    "mistral": Family(tiny.tiny_mistral, no_dropout=_ROTARY_DROPOUT, dept_shared=EVERY_ROW),
    "qwen3": Family(tiny.tiny_qwen3, no_dropout=_ROTARY_DROPOUT),
    "phi3": Family(tiny.tiny_phi3, no_dropout=dict(attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
    "gemma": Family(tiny.tiny_gemma, no_dropout=_ROTARY_DROPOUT),
    "gemma2": Family(tiny.tiny_gemma2, no_dropout=_ROTARY_DROPOUT),
    "gemma3": Family(tiny.tiny_gemma3, no_dropout=_ROTARY_DROPOUT),
    "olmo2": Family(tiny.tiny_olmo2, no_dropout=_ROTARY_DROPOUT),
    "gpt-neox": Family(tiny.tiny_gpt_neox, no_dropout=dict(attention_dropout=0.0, hidden_dropout=0.0)),
    "opt": Family(tiny.tiny_opt, no_dropout=dict(dropout=0.0, attention_dropout=0.0)),
    "falcon": Family(tiny.tiny_falcon, no_dropout=dict(attention_dropout=0.0, hidden_dropout=0.0),
                     dept_shared=EVERY_ROW, prefix=LEGACY_ATTENTION),
    "bloom": Family(tiny.tiny_bloom, no_dropout=dict(attention_dropout=0.0, hidden_dropout=0.0),
                    dept_shared=EVERY_ROW, prefix=LEGACY_ATTENTION),
    # its forward takes no position_ids: tokens cannot be moved after a shared prompt or a prefix
    "bart-causal": Family(tiny.tiny_bart_causal, no_dropout=_BART_DROPOUT, dept_shared=EVERY_ROW,
                          prefix=PREFIX_NO_POSITIONS, mixed=MIXED_NO_POSITIONS),
    "t5": Family(tiny.tiny_t5, encoder_decoder=True, no_dropout=dict(dropout_rate=0.0)),
    "bart": Family(tiny.tiny_bart, encoder_decoder=True, no_dropout=_BART_DROPOUT),
    "mbart": Family(tiny.tiny_mbart, encoder_decoder=True, no_dropout=_BART_DROPOUT),
    "m2m100": Family(tiny.tiny_m2m100, encoder_decoder=True, no_dropout=_BART_DROPOUT),
    # Pegasus, Marian: scale_embedding multiplies inside the stacks' forward, which inputs_embeds skip
    "pegasus": Family(tiny.tiny_pegasus, encoder_decoder=True, no_dropout=_BART_DROPOUT, dept_shared=SCALE_OUTSIDE,
                      dept_every_row=SCALE_OUTSIDE),
    "marian": Family(tiny.tiny_marian, encoder_decoder=True, no_dropout=_BART_DROPOUT, dept_shared=SCALE_OUTSIDE,
                     dept_every_row=SCALE_OUTSIDE),
}

CORE = ("gpt2", "llama-gqa", "qwen2-mqa", "t5")
FAMILIES: Dict[str, Callable[..., nn.Module]] = {name: MATRIX[name].builder for name in CORE}
"""The core families -> builder ``(seed=0, **config_overrides)`` of the tiny model in eval mode."""

ENCODER_DECODERS = tuple(name for name, family in MATRIX.items() if family.encoder_decoder)
DECODERS = {name: builder for name, builder in FAMILIES.items() if name not in ENCODER_DECODERS}

NO_DROPOUT: Dict[str, Dict[str, Any]] = {name: family.no_dropout for name, family in MATRIX.items()}
"""Config overrides that switch each family's dropout off (train mode then computes what eval does)."""

LAYOUTS: Dict[str, Dict[str, Tuple[int, int, int]]] = {
    "gpt2": {"decoder": (2, 4, 10)}, "llama-gqa": {"decoder": (2, 2, 12)}, "qwen2-mqa": {"decoder": (2, 1, 8)},
    "t5": {"encoder": (2, 4, 10), "decoder": (2, 4, 10), "cross": (2, 4, 10)}}
"""Per core family and attention group: (layers, kv_heads, head_dim), the shape of its per-layer prefixes."""


def build(family: str, seed: int = 0, dropout: bool = True, **overrides) -> nn.Module:
    """The family's tiny model (eval mode); ``dropout=False`` switches its dropout off."""
    if not dropout:
        overrides = {**NO_DROPOUT[family], **overrides}
    return MATRIX[family].builder(seed, **overrides)
