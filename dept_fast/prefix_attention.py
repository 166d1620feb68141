"""The prefix K/V route: one attention function, registered with transformers, that puts per-layer
prefix keys/values before each layer's own, passed down as a forward keyword argument.

Why not the Cache API: PEFT hands prefixes over as a pre-filled ``past_key_values`` cache, which
transformers drops under gradient checkpointing in training, silently losing the prefix. Forward
kwargs instead reach the attention function through every layer, and gradient checkpointing replays
them on recomputation; the model's own cache (generation) then holds only real tokens.

Internal API, shared by Prefix-Tuning (``dept_fast.prefix_tuning``) and the shared soft prompt
(``dept_fast.shared_prompt``):

* :data:`ATTENTION_NAME` ``"dept_prefix"``: registered at import with transformers'
  ``AttentionInterface`` (:func:`prefix_attention_forward`) and ``AttentionMaskInterface`` (the
  sdpa boolean mask, never skipped, so padding and causality always arrive explicitly).
* ``with prefix_attention_setup(model) as setup:`` switches a model to it (wrapping ``setup.inner``,
  the ``"sdpa"`` or ``"eager"`` the model was using), finds its ``setup.stacks`` (the modules whose
  forward builds positions and masks: ``GPT2Model``, ``LlamaModel``, T5's two ``T5Stack``) and runs
  each once on one token to tag every attention module it calls, in call order, with attribute
  :data:`PREFIX_SLOT_ATTR` = its slot (0, 1, ...; ``setup.layouts`` = (layers, kv_heads, head_dim)).
  Models whose attention does not call the function, whose layers do not pass the kwarg on, or
  that are neither causal decoders nor T5 are refused; all is undone if the ``with`` body raises.
* The forward kwarg :data:`PREFIX_KWARG` (``dept_prefix``) carries a :class:`PrefixKV`:
  ``key_values[slot]`` = that layer's (key, value) prefix, each (1, kv_heads, p, head_dim) (or
  batch rows instead of 1), expanded to the batch inside the function, never repeated; ``capture``
  = a dict the function fills with slot -> the layer's own (key, value) of this pass (after RoPE,
  before any prefix is joined; the shared prompt records its batch-1 pass this way); ``inner``.
  Modules without a slot (e.g. T5 cross-attention) run the wrapped implementation untouched.
* :func:`prefix_forward_kwargs` builds a stack's forward kwargs for one pass (the kwarg plus
  ``position_ids`` that start after the prefix); :func:`forward_arguments` turns a pre-hook's
  (args, kwargs) into kwargs by name. :func:`begin_pass` is what a hook checks before every pass
  (the model still uses the prefix attention; in training, the reentrant-checkpointing guard).
* :func:`attend_with_prefix` is the one slot for a Triton prefix-attention kernel. Today it
  concatenates per layer (and, while generating, re-concatenates the growing cache every step).

A pass with prefixes, as Prefix-Tuning's forward pre-hook on each stack runs it::

    kwargs = forward_arguments(inspect.signature(stack.forward), args, kwargs)
    return (), prefix_forward_kwargs(kwargs, key_values, inner=setup.inner)

The shared prompt: a batch-1 pass of the prompt with ``prefix_forward_kwargs(kwargs, capture=kv,
inner=...)`` fills ``kv``; the input pass then gets ``key_values=[kv[slot] for slot in range(layers)]``.

Reentrant checkpointing (``use_reentrant=True``, transformers 4.x's default) does not carry
gradients through tensors passed as kwargs (the prefix gradient comes out wrong, silently). The
guard switches transformers' checkpointing functions to non-reentrant with a warning; any other
reentrant wrapper is caught inside the attention function (recording was on when the pass began,
is off in the attention, and the prefix requires grad, or a prompt pass is being captured) and
refused with an error.
"""
import functools
import inspect
import sys
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION_NAME = "dept_prefix"
PREFIX_KWARG = "dept_prefix"
PREFIX_SLOT_ATTR = "dept_prefix_slot"
INNER_IMPLEMENTATIONS = ("sdpa", "eager")
ENCODER_DECODER_TYPES = ("t5",)
_wrapped: Dict[int, str] = {}  # id(config) -> the implementation the prefix attention wraps for it

KeyValue = Tuple[torch.Tensor, torch.Tensor]


class PrefixKV(NamedTuple):
    """The ``dept_prefix`` forward kwarg: what the prefix attention function does in one pass."""

    key_values: Optional[Sequence[KeyValue]] = None
    """Per slot, the (key, value) prefix, each (1 or batch, kv_heads, p, head_dim); None: no prefix."""
    capture: Optional[Dict[int, KeyValue]] = None
    """Filled with slot -> the layer's own (key, value), each (batch, kv_heads, length, head_dim)."""
    inner: str = "sdpa"
    """The wrapped implementation: "sdpa" or "eager" (the model family's own eager function)."""
    grad_enabled: bool = False
    """Whether gradients were being recorded when the pass began (set by :func:`prefix_forward_kwargs`):
    if so and recording is off inside the attention, a reentrant checkpoint has switched it off."""


_SDPA_MASK = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
_NO_SKIP = {name: False for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip")
            if name in inspect.signature(_SDPA_MASK).parameters}


def prefix_attention_mask(*args, **kwargs) -> Optional[torch.Tensor]:
    """transformers' sdpa mask (bool, True = attend) without its skips: a causal or unpadded mask
    is materialised rather than left to ``is_causal``, which cannot express the prefix columns
    (and which an eager implementation would ignore)."""
    return _SDPA_MASK(*args, **{**kwargs, **_NO_SKIP})


def _eager_attention(module: nn.Module) -> Callable:
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise TypeError(f"{type(module).__name__}'s module defines no eager_attention_forward; "
                        "build the model with attn_implementation='sdpa' to use prefix attention")
    return function


def call_inner(inner: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the wrapped implementation; eager gets the boolean mask as an additive one."""
    if inner == "sdpa":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, torch.zeros((), dtype=query.dtype, device=query.device),
                                     torch.finfo(query.dtype).min)
    return _eager_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _mask_with_prefix(attention_mask: Optional[torch.Tensor], n_prefix: int, q_len: int, kv_len: int,
                      causal: bool, device: torch.device) -> Optional[torch.Tensor]:
    """Give the mask over the own keys ``n_prefix`` leading attend columns. A missing mask means
    "attend to all" unless the module is causal, where it becomes the causal mask (query i sees own
    keys j <= i + kv_len - q_len, the alignment a cache gives)."""
    if attention_mask is None:
        if not causal or q_len == 1:
            return None
        positions = torch.arange(kv_len, device=device)
        attention_mask = positions <= torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    attend = True if attention_mask.dtype == torch.bool else 0.0
    return F.pad(attention_mask, (n_prefix, 0), value=attend)


def attend_with_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                       inner: str, **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of ``query`` (b, heads, q, head_dim) over ``[prefix ; own keys]``.

    This is the one slot for a Triton prefix-attention kernel. Today it expands the prefix (1,
    kv_heads, p, head_dim) to the batch (a view), concatenates it before the layer's keys/values,
    gives the mask p leading attend columns (and T5's position bias p zero columns: the prefix has
    no position) and calls the wrapped implementation with ``is_causal`` off. A fused kernel would
    attend to the one unexpanded prefix for all rows and merge that with each row's own attention
    by log-sum-exp, never materialising the concatenation; it must keep this signature and return
    (output (b, q, heads, head_dim), attention weights or None), exactly as the code below.
    See :func:`dept_fast.reference.prefix_attention_reference` for the math.
    """
    batch, n_prefix = key.shape[0], prefix_key.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    attention_mask = _mask_with_prefix(attention_mask, n_prefix, query.shape[2], key.shape[2], causal, query.device)
    key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = F.pad(kwargs["position_bias"], (n_prefix, 0))
    return call_inner(inner, module, query, key, value, attention_mask, is_causal=False, **kwargs)


_REENTRANT_ERROR = (
    "prefix attention: gradient recording was switched off between the model's forward and its attention "
    "while the prefix requires grad (or the keys/values captured for a shared prompt do). "
    "This is reentrant activation checkpointing (use_reentrant=True), which does not carry gradients "
    "through keyword arguments: the prefix gradient would be wrong. Use non-reentrant checkpointing, "
    "e.g. model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).")

_calls: Optional[List[Tuple[nn.Module, torch.Tensor, bool]]] = None  # set only inside _recording_calls()


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dept_prefix: Optional[PrefixKV] = None,
                             **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The registered attention function (``attn_implementation="dept_prefix"``); see the module docstring."""
    spec = dept_prefix if dept_prefix is not None else PrefixKV()
    if _calls is not None:
        _calls.append((module, key, dept_prefix is not None))
    slot = getattr(module, PREFIX_SLOT_ATTR, None)
    if slot is not None and spec.capture is not None:
        if spec.grad_enabled and not torch.is_grad_enabled():  # the captured K/V would carry no gradient
            raise RuntimeError(_REENTRANT_ERROR)
        spec.capture[slot] = (key, value)
    if slot is not None and spec.key_values is not None:
        prefix_key, prefix_value = spec.key_values[slot]
        if spec.grad_enabled and not torch.is_grad_enabled() and (prefix_key.requires_grad or
                                                                  prefix_value.requires_grad):
            raise RuntimeError(_REENTRANT_ERROR)
        return attend_with_prefix(module, query, key, value, attention_mask, prefix_key, prefix_value, spec.inner,
                                  **kwargs)
    return call_inner(spec.inner, module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, prefix_attention_mask)


class PrefixAttentionSetup(NamedTuple):
    """What :func:`prefix_attention_setup` prepared on a model."""

    inner: str
    """The implementation the prefix attention wraps: "sdpa" or "eager"."""
    stacks: Dict[str, nn.Module]
    """"decoder" (causal decoders: the base model) or "encoder" and "decoder" (T5's stacks): the
    modules whose forward builds positions and masks and runs the attention layers."""
    layouts: Dict[str, Tuple[int, int, int]]
    """Per stack, (layers, kv_heads, head_dim) of its tagged self-attention layers."""


@contextmanager
def prefix_attention_setup(model: nn.Module) -> Iterator[PrefixAttentionSetup]:
    """Switch ``model`` to the prefix attention and tag its stacks' self-attention layers.

    Causal decoders whose attention goes through ``AttentionInterface`` (GPT-2, Llama, ...) and the
    encoder-decoders in :data:`ENCODER_DECODER_TYPES`; every layer of a stack must share one key/value
    layout. Raises TypeError/ValueError naming what does not fit. Everything is undone if the body of
    the ``with`` raises, unless the model already used the prefix attention before (another adapter).
    """
    stacks = attention_stacks(model)
    was = model.config._attn_implementation
    inner = _use_prefix_attention(model, list(stacks.values()))
    try:
        layouts = {name: _tag_stack(model, name, stack, inner, causal=len(stacks) == 1)
                   for name, stack in stacks.items()}
        yield PrefixAttentionSetup(inner, stacks, layouts)
    except BaseException:
        if was != ATTENTION_NAME:
            for stack in stacks.values():
                for module in stack.modules():
                    if hasattr(module, PREFIX_SLOT_ATTR):
                        delattr(module, PREFIX_SLOT_ATTR)
            _set_attention(model, stacks.values(), was)
        raise


def attention_stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """See :attr:`PrefixAttentionSetup.stacks`; raises for models that are not supported."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        if config.model_type not in ENCODER_DECODER_TYPES:
            raise ValueError(f"prefix attention supports causal decoders and the encoder-decoders "
                             f"{ENCODER_DECODER_TYPES}; got model_type {config.model_type!r}")
        return {"encoder": model.get_encoder(), "decoder": model.get_decoder()}
    return {"decoder": model.base_model}


def _set_attention(model: nn.Module, stacks: Iterable[nn.Module], implementation: str) -> None:
    """``model.set_attn_implementation`` and, where it did not reach (transformers < 5.23 skips
    submodels whose config has the model's config class, e.g. T5's stacks), each stack's."""
    model.set_attn_implementation(implementation)
    for stack in stacks:
        if stack.config._attn_implementation != implementation:
            stack.set_attn_implementation(implementation)


def _use_prefix_attention(model: nn.Module, stacks: Sequence[nn.Module]) -> str:
    """Switch ``model`` and its ``stacks`` to :data:`ATTENTION_NAME`; return the wrapped
    implementation (what the model used). A config object is shared by every model built from it,
    so a model whose config another model already switched wraps what that one wrapped."""
    current = model.config._attn_implementation
    if current == ATTENTION_NAME:
        return _wrapped.get(id(model.config), "sdpa")
    if current not in INNER_IMPLEMENTATIONS:
        raise ValueError(f"prefix attention wraps attn_implementation 'sdpa' or 'eager'; {type(model).__name__} "
                         f"uses {current!r}. Load the model with attn_implementation='sdpa' (or 'eager')")
    _set_attention(model, stacks, ATTENTION_NAME)
    configs = [model.config] + [stack.config for stack in stacks]
    if any(config._attn_implementation != ATTENTION_NAME for config in configs):
        _set_attention(model, stacks, current)
        raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                        "AttentionInterface, so prefix K/V cannot be joined to its layers")
    for config in configs:
        _wrapped[id(config)] = current
        weakref.finalize(config, _wrapped.pop, id(config), None)
    return current


@contextmanager
def _recording_calls() -> Iterator[List[Tuple[nn.Module, torch.Tensor, bool]]]:
    global _calls
    _calls = []
    try:
        yield _calls
    finally:
        _calls = None


def _tag_stack(model: nn.Module, name: str, stack: nn.Module, inner: str, causal: bool) -> Tuple[int, int, int]:
    """Run ``stack`` once on one token (no grad) and tag, in call order, every module that called
    the prefix attention function with :data:`PREFIX_SLOT_ATTR` = its slot. Recording the calls
    means only modules that really go through ``AttentionInterface`` and really receive the kwarg
    are tagged. Returns the stack's (layers, kv_heads, head_dim)."""
    kind = type(stack).__name__
    ids = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
    with _recording_calls() as calls, torch.no_grad():
        stack(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
              **{PREFIX_KWARG: PrefixKV(inner=inner)})
    if not calls:
        raise TypeError(f"{kind}'s attention layers never called the '{ATTENTION_NAME}' attention function: "
                        "its attention does not go through transformers' AttentionInterface")
    if not all(received for _, _, received in calls):
        raise TypeError(f"{kind} does not pass forward keyword arguments down to its attention layers, "
                        "so it cannot receive prefix keys/values")
    modules = [module for module, _, _ in calls]
    if len({id(module) for module in modules}) != len(modules):
        raise TypeError(f"{kind} calls the same attention module more than once per forward (shared layers); "
                        "per-layer prefixes are not defined for it")
    if causal and not all(getattr(module, "is_causal", False) for module in modules):
        raise ValueError(f"{type(model).__name__} is not a causal decoder (its self-attention is bidirectional); "
                         f"prefix attention supports causal decoders and {ENCODER_DECODER_TYPES}")
    shapes = {(key.shape[1], key.shape[3]) for _, key, _ in calls}
    if len(shapes) != 1:
        raise ValueError(f"{kind}'s layers differ in key/value heads x head_dim {sorted(shapes)}; "
                         f"the {name} prefixes need one layout for all layers")
    for slot, module in enumerate(modules):
        setattr(module, PREFIX_SLOT_ATTR, slot)
    return (len(modules),) + shapes.pop()


def forward_arguments(signature: inspect.Signature, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A forward pre-hook's (args, kwargs) as one dict by parameter name (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = [name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    for name in extra:
        bound.update(bound.pop(name, {}))
    return dict(bound)


def prefix_position_ids(n_prefix: int, kwargs: Dict[str, Any]) -> torch.Tensor:
    """Positions of a stack's input tokens when ``n_prefix`` prefix slots come first.

    The caller's ``position_ids`` + n_prefix when given; else each token's index among its row's
    real tokens, ``cumsum(attention_mask) - 1`` (so a left-padded row sees the same positions as
    the row alone, as in HF ``generate()``), + n_prefix; else ``arange`` after the cached tokens.
    Without padding all three give n_prefix, n_prefix + 1, ... as a pre-filled cache would.
    """
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"] + n_prefix
    inputs = kwargs.get("input_ids")
    inputs = inputs if inputs is not None else kwargs["inputs_embeds"]
    q_len = inputs.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q_len:] + n_prefix
    past = cached_length(kwargs)
    return torch.arange(past + n_prefix, past + n_prefix + q_len, device=inputs.device).unsqueeze(0)


CACHE_KWARGS = ("cache", "past_key_values")
"""The generation cache's forward argument: ``cache`` from transformers 5.24, ``past_key_values`` before."""


def cached_length(kwargs: Dict[str, Any]) -> int:
    """Tokens already in the generation cache a forward's kwargs carry (0 without one)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return int(kwargs[name].get_seq_length())
    return 0


def prefix_forward_kwargs(kwargs: Dict[str, Any], key_values: Optional[Sequence[KeyValue]] = None,
                          capture: Optional[Dict[int, KeyValue]] = None, inner: str = "sdpa",
                          shift_positions: bool = True) -> Dict[str, Any]:
    """A stack's forward kwargs (by name, see :func:`forward_arguments`) for one pass through the
    prefix attention: ``dept_prefix`` set, and with ``key_values`` and ``shift_positions`` (stacks
    with absolute or rotary positions, not T5) ``position_ids`` from :func:`prefix_position_ids`."""
    kwargs = {**kwargs, PREFIX_KWARG: PrefixKV(key_values, capture, inner, torch.is_grad_enabled())}
    if key_values and shift_positions:
        kwargs["position_ids"] = prefix_position_ids(key_values[0][0].shape[2], kwargs)
    return kwargs


def checkpointed_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that transformers' gradient checkpointing may switch on (for
    :func:`begin_pass`)."""
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def begin_pass(module: nn.Module, inner: str, checkpointed: Iterable[nn.Module]) -> None:
    """Before a pass with prefix K/V through ``module`` (a stack, or the model around it): refuse
    if its ``attn_implementation`` was switched away from :data:`ATTENTION_NAME`, and in training
    switch reentrant checkpointing of ``checkpointed`` to non-reentrant
    (:func:`use_non_reentrant_checkpointing`)."""
    if module.config._attn_implementation != ATTENTION_NAME:
        raise RuntimeError(f"{type(module).__name__}'s attn_implementation was changed to "
                           f"{module.config._attn_implementation!r}; the prefix keys/values need "
                           f"{ATTENTION_NAME!r} (it wraps {inner!r})")
    if module.training:
        use_non_reentrant_checkpointing(checkpointed)


def use_non_reentrant_checkpointing(modules: Iterable[nn.Module]) -> None:
    """Switch transformers' reentrant checkpointing on ``modules`` to non-reentrant, with a warning.

    transformers stores ``functools.partial(checkpoint, **kwargs)`` as each layer's
    ``_gradient_checkpointing_func``; ``use_reentrant`` True or absent (torch's default is True) is
    replaced by False. Other checkpoint wrappers are left alone; if they are reentrant the attention
    function refuses them (see the module docstring).
    """
    switched = False
    for module in modules:
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and isinstance(function, functools.partial) \
                and function.keywords.get("use_reentrant", True) is not False:
            module._gradient_checkpointing_func = functools.partial(
                function.func, *function.args, **{**function.keywords, "use_reentrant": False})
            switched = True
    if switched:
        warnings.warn("dept_fast prefix attention: switched activation checkpointing to use_reentrant=False; "
                      "reentrant checkpointing does not carry gradients through the prefix keys/values",
                      stacklevel=3)
