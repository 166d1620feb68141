"""Encoder-decoder Prefix-Tuning references built from the plain model, without dept_fast.

Two independent constructions (Li & Liang's three prefixes; the prefix has no position):

* :func:`prefix_attention`: the plain model with its attention implementation switched, for the
  duration of the context, to :func:`_reference_attention`: plain PyTorch math (scores, additive mask,
  T5's position bias, softmax, values) over ``[prefix ; own keys]`` for the modules given prefixes,
  found by their place in the family's modeling code (:func:`attention_modules`) -- not by
  dept_fast's route discovery. Every query attends to every prefix slot; the prefix columns get no
  position bias.
* :func:`cross_prefix_from_encoder_states`: a cross-attention prefix whose keys/values are each
  layer's own cross-attention projections of extra encoder-output vectors ``H`` (p, d) is, for the
  decoder, the plain model run with ``encoder_outputs = [H ; encoder output]`` and the encoder mask
  extended with p ones: an exact reference for every prefix of that span, through the model's own
  kernels and caches.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_outputs import BaseModelOutput
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

KeyValue = Tuple[torch.Tensor, torch.Tensor]
REFERENCE = "test_reference_prefix"
_PREFIXES: Dict[int, KeyValue] = {}
"""id(attention module) -> its prefix (key, value), each (1 or b, kv_heads, p, head_dim), while a
:func:`prefix_attention` context is active (tests run one at a time)."""


def attention_modules(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """Per attention group, the layers' attention modules in layer order, from the family's modeling
    code: T5's ``block[i].layer[0].SelfAttention`` / ``layer[1].EncDecAttention``, the BART family's
    ``layers[i].self_attn`` / ``encoder_attn``."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    if hasattr(encoder, "block"):
        return {"encoder": [b.layer[0].SelfAttention for b in encoder.block],
                "decoder": [b.layer[0].SelfAttention for b in decoder.block],
                "cross": [b.layer[1].EncDecAttention for b in decoder.block]}
    return {"encoder": [layer.self_attn for layer in encoder.layers],
            "decoder": [layer.self_attn for layer in decoder.layers],
            "cross": [layer.encoder_attn for layer in decoder.layers]}


def _reference_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, position_bias: Optional[torch.Tensor] = None, **kwargs):
    """softmax(q k^T * scaling + bias + mask) v over [prefix ; own keys] (fp32 softmax, no dropout)."""
    batch, heads, q_len, head_dim = query.shape
    own = key.shape[2]
    prefix = _PREFIXES.get(id(module))
    n = 0
    if prefix is not None:
        n = prefix[0].shape[2]
        key = torch.cat([prefix[0].expand(batch, -1, -1, -1).to(key.dtype), key], 2)
        value = torch.cat([prefix[1].expand(batch, -1, -1, -1).to(value.dtype), value], 2)
    repeat = heads // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scale = head_dim ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)).float() * scale
    if position_bias is not None:
        scores = scores + F.pad(position_bias.float(), (n, 0))
    if attention_mask is not None:
        scores = scores + F.pad(attention_mask.float(), (n, 0))
    elif getattr(module, "is_causal", False) and q_len > 1:
        hidden = torch.ones(q_len, own, dtype=torch.bool).triu(own - q_len + 1)
        scores = scores.masked_fill(F.pad(hidden, (n, 0)), float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS.get("eager", eager_mask))


@contextmanager
def prefix_attention(model: nn.Module, prefixes: Dict[str, List[KeyValue]]) -> Iterator[nn.Module]:
    """Within the context, ``model`` (a plain encoder-decoder) attends with ``prefixes[group][layer]``
    joined before each layer's keys/values (see the module docstring); restored after."""
    was = model.config._attn_implementation
    modules = attention_modules(model)
    _PREFIXES.clear()
    for group, layers in prefixes.items():
        for module, pair in zip(modules[group], layers, strict=True):
            _PREFIXES[id(module)] = pair
    submodels = [m for m in model.modules() if hasattr(m, "set_attn_implementation") and hasattr(m, "config")]
    try:
        for submodel in [model] + submodels:
            submodel.set_attn_implementation(REFERENCE)
        yield model
    finally:
        _PREFIXES.clear()
        for submodel in [model] + submodels:
            submodel.set_attn_implementation(was)


def cross_prefix_from_encoder_states(model: nn.Module, states: torch.Tensor) -> List[KeyValue]:
    """Each decoder layer's cross-attention (key, value) of ``states`` (p, d): (1, kv_heads, p, head_dim)."""
    result = []
    for module in attention_modules(model)["cross"]:
        k_proj, v_proj = (module.k, module.v) if hasattr(module, "k") else (module.k_proj, module.v_proj)
        head_dim = getattr(module, "key_value_proj_dim", None) or module.head_dim
        shape = (1, states.shape[0], -1, head_dim)
        result.append(tuple(proj(states).view(shape).transpose(1, 2) for proj in (k_proj, v_proj)))
    return result


def with_encoder_states(model: nn.Module, states: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> Dict[str, object]:
    """The plain model's ``encoder_outputs`` and ``attention_mask`` with ``states`` (p, d) before each
    row's encoder output and p ones before its encoder mask, for its forward or ``generate()``: the
    decoder sees them as a cross-attention prefix."""
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    batch = input_ids.shape[0]
    joined = torch.cat([states.expand(batch, -1, -1).to(encoded.dtype), encoded], 1)
    mask = torch.cat([torch.ones(batch, states.shape[0], dtype=attention_mask.dtype), attention_mask], 1)
    return dict(encoder_outputs=BaseModelOutput(last_hidden_state=joined), attention_mask=mask)
