"""The prefix attention function: per-layer prefix keys/values joined before each layer's own.

Registered with transformers' ``AttentionInterface`` once per wrapped implementation:
``"dept_prefix"`` wraps ``"sdpa"``, ``"dept_prefix_eager"`` the model family's own eager function
(:data:`ATTENTION_NAMES`), so a model's ``config._attn_implementation`` alone says what is
wrapped. Each name also gets a mask function (transformers' sdpa boolean mask, never skipped, so
padding and causality always arrive explicitly). A model is switched onto it by
:mod:`dept_fast.hf.route`.

One pass's instructions reach the function as the forward keyword argument :data:`PREFIX_KWARG`
(``dept_prefix``), a :class:`PrefixKV` that transformers hands down to every attention layer and
gradient checkpointing replays. Modules tagged with :data:`PREFIX_SLOT_ATTR` (their slot 0, 1, ...
among a stack's self-attention layers) get ``key_values[slot]``; untagged ones (e.g. T5
cross-attention) run the wrapped implementation untouched.

Why not the Cache API: PEFT hands prefixes over as a pre-filled ``past_key_values`` cache, which
transformers drops under gradient checkpointing in training, silently losing the prefix. Forward
kwargs instead reach the attention function through every layer, and checkpointing replays them;
the model's own cache (generation) then holds only real tokens.

Reentrant checkpointing (``use_reentrant=True``) does not carry gradients through tensors passed as
kwargs: if recording was on when the pass began, is off in the attention, and the prefix requires
grad (or a prompt pass is being captured), the function refuses with an error.
"""
import functools
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = Tuple[torch.Tensor, torch.Tensor]

PREFIX_KWARG = "dept_prefix"
PREFIX_SLOT_ATTR = "dept_prefix_slot"
ATTENTION_NAMES = {"sdpa": "dept_prefix", "eager": "dept_prefix_eager"}
"""Wrapped implementation -> the name the prefix attention wrapping it is registered under."""


class PrefixKV:
    """The ``dept_prefix`` forward kwarg: what the prefix attention does in one pass.

    A plain object, not a tuple or dict: engines that rebuild containers of tensors found in forward
    kwargs (FSDP2's per-module input casting) then hand every layer this same object, so what the
    layers write into it (``capture``) reaches the caller.

    Attributes:
        key_values: per slot, the (key, value) prefixes, each (n, kv_heads, p, head_dim): n = 1 (every
            row attends to it) or one row per prefix source of a mixed batch; None: no prefix.
        source: (b,) int64, the ``key_values`` row each batch row attends to, -1 for none; None:
            every row attends to row 0.
        valid: (n, p) bool, which slots of each source are real (sources of different lengths are
            padded to p); None: all.
        capture: filled with slot -> the layer's own (key, value) of this pass (after RoPE, before a
            prefix is joined), each (batch, kv_heads, length, head_dim).
        grad_enabled: whether gradients were being recorded when the pass began (if so and recording
            is off inside the attention, a reentrant checkpoint has switched it off).
        state: what a hook that set this pass up leaves for the hook that completes it (e.g. the
            shared prompt's labels and logits), carried with the call, never on the model.
    """

    __slots__ = ("key_values", "source", "valid", "capture", "grad_enabled", "state")

    def __init__(self, key_values: Optional[Sequence[KeyValue]] = None, source: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None, capture: Optional[Dict[int, KeyValue]] = None,
                 grad_enabled: bool = False, state: Any = None) -> None:
        self.key_values = key_values
        self.source = source
        self.valid = valid
        self.capture = capture
        self.grad_enabled = grad_enabled
        self.state = state

    def row_valid(self, batch: int) -> Optional[torch.Tensor]:
        """(b, p) bool: the prefix slots each row attends to; None when every row attends to all of
        one shared prefix."""
        if self.source is None:
            return None if self.valid is None else self.valid[:1].expand(batch, -1)
        valid = self.valid if self.valid is not None else torch.ones(
            self.key_values[0][0].shape[0], self.key_values[0][0].shape[2], dtype=torch.bool,
            device=self.source.device)
        return valid[self.source.clamp_min(0)] & (self.source >= 0)[:, None]


def wrapped_implementation(attn_implementation: Optional[str]) -> Optional[str]:
    """The implementation a prefix attention name wraps ("sdpa"/"eager"), or None for any other name."""
    return {name: inner for inner, name in ATTENTION_NAMES.items()}.get(attn_implementation)


def _eager_attention(module: nn.Module) -> Callable:
    """The model family's own eager attention (transformers defines one per modeling module)."""
    function = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if function is None:
        raise TypeError(f"{type(module).__name__}'s module defines no eager_attention_forward; "
                        "build the model with attn_implementation='sdpa' to use prefix attention")
    return function


def call_inner(inner: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the wrapped implementation; eager gets the boolean mask as an additive one."""
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, torch.zeros((), dtype=query.dtype, device=query.device),
                                     torch.finfo(query.dtype).min)
    return _eager_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _mask_with_prefix(attention_mask: Optional[torch.Tensor], prefix_valid: Optional[torch.Tensor], n_prefix: int,
                      batch: int, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Optional[torch.Tensor]:
    """Give the mask over the own keys ``n_prefix`` leading prefix columns: attend to all of them, or
    per row to ``prefix_valid`` (b, p). A missing mask means "attend to all" unless the module is
    causal, where it becomes the causal mask (query i sees own keys j <= i + kv_len - q_len, the
    alignment a cache gives)."""
    if attention_mask is None:
        if prefix_valid is None and (not causal or q_len == 1):
            return None
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        if causal:
            attention_mask = attention_mask.tril(kv_len - q_len)
    boolean = attention_mask.dtype == torch.bool
    if prefix_valid is None:
        return F.pad(attention_mask, (n_prefix, 0), value=True if boolean else 0.0)
    columns = prefix_valid[:, None, None, :].expand(batch, 1, q_len, n_prefix)
    if not boolean:
        columns = torch.zeros((), dtype=attention_mask.dtype, device=device).masked_fill(
            ~columns, torch.finfo(attention_mask.dtype).min)
    own = attention_mask.expand(batch, 1, q_len, kv_len)
    return torch.cat([columns.to(own.dtype), own], dim=-1)


def attend_with_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], prefix: PrefixKV, slot: int, inner: str,
                       **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of ``query`` (b, heads, q, head_dim) over ``[prefix ; own keys]``.

    This is the one slot for a Triton prefix-attention kernel. Today it takes layer ``slot``'s
    prefix (n, kv_heads, p, head_dim), expanded to the batch when every row shares it (a view) or
    gathered per row by ``prefix.source`` in a mixed batch (a (b, kv_heads, p, head_dim) copy: the
    concatenation below copies it once more, so a mixed batch materialises the prefix rows twice,
    never per-row copies of anything else), concatenates it before the layer's keys/values, gives the
    mask p leading prefix columns (real slots only, per row, in a mixed batch; T5's position bias p
    zero columns: the prefix has no position) and calls the wrapped implementation with
    ``is_causal`` off. A fused kernel would attend to the unexpanded prefixes and merge that with
    each row's own attention by log-sum-exp, never materialising the concatenation; it must keep
    this signature and return (output (b, q, heads, head_dim), attention weights or None), exactly
    as the code below. See :func:`dept_fast.ops.prefix_attention_reference` for the math.
    """
    batch = key.shape[0]
    prefix_key, prefix_value = prefix.key_values[slot]
    n_prefix = prefix_key.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    attention_mask = _mask_with_prefix(attention_mask, prefix.row_valid(batch), n_prefix, batch, query.shape[2],
                                       key.shape[2], causal, query.device)
    if prefix.source is None:
        prefix_key, prefix_value = (t.expand(batch, -1, -1, -1) for t in (prefix_key, prefix_value))
    else:
        rows = prefix.source.clamp_min(0)
        prefix_key, prefix_value = prefix_key[rows], prefix_value[rows]
    key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = F.pad(kwargs["position_bias"], (n_prefix, 0))
    return call_inner(inner, module, query, key, value, attention_mask, is_causal=False, **kwargs)


Call = Tuple[nn.Module, torch.Tensor, bool]
_probe_calls: ContextVar[Optional[List[Call]]] = ContextVar("dept_fast_probe_calls", default=None)


@contextmanager
def recording_calls() -> Iterator[List[Call]]:
    """Within the context (this thread / task only), every call of the prefix attention appends
    (module, key, whether it received the kwarg): how :mod:`dept_fast.hf.route` probes a model."""
    calls: List[Call] = []
    token = _probe_calls.set(calls)
    try:
        yield calls
    finally:
        _probe_calls.reset(token)


REENTRANT_ERROR = (
    "prefix attention: gradient recording was switched off between the model's forward and its attention "
    "while the prefix requires grad (or the keys/values captured for a shared prompt do). "
    "This is reentrant activation checkpointing (use_reentrant=True), which does not carry gradients "
    "through keyword arguments: the prefix gradient would be wrong. Use non-reentrant checkpointing, "
    "e.g. model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).")


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dept_prefix: Optional[PrefixKV] = None, *,
                             inner: str = "sdpa", **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The registered attention function (wrapping ``inner``); see the module docstring."""
    spec = dept_prefix if dept_prefix is not None else PrefixKV()
    calls = _probe_calls.get()
    if calls is not None:
        calls.append((module, key, dept_prefix is not None))
    slot = getattr(module, PREFIX_SLOT_ATTR, None)
    lost_grad = spec.grad_enabled and not torch.is_grad_enabled()
    if slot is not None and spec.capture is not None:
        if lost_grad:  # the captured K/V would carry no gradient
            raise RuntimeError(REENTRANT_ERROR)
        spec.capture[slot] = (key, value)
    if slot is not None and spec.key_values is not None:
        if lost_grad and any(t.requires_grad for t in spec.key_values[slot]):
            raise RuntimeError(REENTRANT_ERROR)
        return attend_with_prefix(module, query, key, value, attention_mask, spec, slot, inner, **kwargs)
    return call_inner(inner, module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the prefix attention (and its mask function) under every name of :data:`ATTENTION_NAMES`
    with transformers; idempotent. Called when a model is switched onto it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    no_skip = {name: False for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip")
               if name in inspect.signature(sdpa_mask).parameters}

    def prefix_attention_mask(*args, **kwargs) -> Optional[torch.Tensor]:
        """transformers' sdpa mask (bool, True = attend) without its skips: a causal or unpadded mask
        is materialised rather than left to ``is_causal``, which cannot express the prefix columns
        (and which an eager implementation would ignore)."""
        return sdpa_mask(*args, **{**kwargs, **no_skip})

    for inner, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, functools.partial(prefix_attention_forward, inner=inner))
        AttentionMaskInterface.register(name, prefix_attention_mask)
