"""Switching a model onto the prefix attention, and the record of it: :class:`PrefixRoute`.

``with prefix_route(model) as route:`` switches ``model`` to the prefix attention of
:mod:`dept_fast.hf.attention` (wrapping the implementation it used: sdpa, eager, flex_attention,
flash_attention_*, a kernel registered by name), finds its
``route.stacks`` (the modules whose forward builds positions and masks: ``GPT2Model``,
``LlamaModel``, T5's two ``T5Stack``) and probes each once on one token to tag every attention
module it calls, in call order, with its slot (``route.layouts`` = per stack (layers, kv_heads,
head_dim)). Models whose attention does not call the function, whose layers do not pass the kwarg
on, or that are neither causal decoders nor T5 are refused; everything is undone if the ``with``
body raises, unless the model was on the prefix attention before. The route is kept on the model
(attribute :data:`ROUTE_ATTR`); every adapter that passes prefix keys/values uses the one route.
"""
import functools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..distributed import gathered_forward
from .attention import (ATTENTION_NAMES, PREFIX_KWARG, PREFIX_SLOT_ATTR, PrefixKV, recording_calls, register,
                        wrapped_implementation)

ROUTE_ATTR = "_dept_fast_route"
ENCODER_DECODER_TYPES = ("t5",)


@dataclass
class PrefixRoute:
    """A model on the prefix attention."""

    inner: str
    """The implementation the prefix attention wraps ("sdpa", "eager", "flex_attention", ...)."""
    stacks: Dict[str, nn.Module]
    """"decoder" (causal decoders: the base model) or "encoder" and "decoder" (T5's stacks)."""
    layouts: Dict[str, Tuple[int, int, int]]
    """Per stack, (layers, kv_heads, head_dim) of its tagged self-attention layers."""
    checkpointed: List[nn.Module]
    """The modules transformers' gradient checkpointing may switch on (see :meth:`begin_pass`)."""

    def begin_pass(self, module: nn.Module) -> None:
        """Before a pass with prefix K/V through ``module`` (a stack, or the model around it): refuse
        if its ``attn_implementation`` was switched away, and in training switch reentrant
        checkpointing to non-reentrant (:func:`use_non_reentrant_checkpointing`)."""
        name = ATTENTION_NAMES[self.inner]
        if module.config._attn_implementation != name:
            raise RuntimeError(f"{type(module).__name__}'s attn_implementation was changed to "
                               f"{module.config._attn_implementation!r}; the prefix keys/values need "
                               f"{name!r} (it wraps {self.inner!r})")
        if module.training:
            use_non_reentrant_checkpointing(self.checkpointed)


def route_of(model: nn.Module) -> Optional[PrefixRoute]:
    """The model's :class:`PrefixRoute`, or None when no adapter switched it onto the prefix attention."""
    return model.__dict__.get(ROUTE_ATTR)


@contextmanager
def prefix_route(model: nn.Module) -> Iterator[PrefixRoute]:
    """Switch ``model`` onto the prefix attention (see the module docstring); a no-op beyond the
    probe for a model already on it."""
    stacks = attention_stacks(model)
    was = model.config._attn_implementation
    inner = wrapped_implementation(was)
    if inner is None:
        inner = _switch(model, list(stacks.values()), was)
    try:
        layouts = {name: _tag_stack(model, name, stack, causal=len(stacks) == 1) for name, stack in stacks.items()}
        route = route_of(model) or PrefixRoute(inner, stacks, layouts, checkpointed_modules(model))
        yield route
        model.__dict__[ROUTE_ATTR] = route
    except BaseException:
        if wrapped_implementation(was) is None:
            for stack in stacks.values():
                for module in stack.modules():
                    if hasattr(module, PREFIX_SLOT_ATTR):
                        delattr(module, PREFIX_SLOT_ATTR)
            _set_attention(model, stacks.values(), was)
        raise


def attention_stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """See :attr:`PrefixRoute.stacks`; raises for models that are not supported."""
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


def _switch(model: nn.Module, stacks: List[nn.Module], current: str) -> str:
    """Switch ``model`` and its ``stacks`` from ``current`` to the prefix attention wrapping it
    (:func:`~dept_fast.hf.attention.register` says why when ``current`` cannot carry a prefix)."""
    try:
        name = register(current)
    except ValueError as error:
        raise ValueError(f"{type(model).__name__}: {error}") from error
    _set_attention(model, stacks, name)
    if any(config._attn_implementation != name for config in [model.config] + [s.config for s in stacks]):
        _set_attention(model, stacks, current)
        raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                        "AttentionInterface, so prefix K/V cannot be joined to its layers")
    return current


def _tag_stack(model: nn.Module, name: str, stack: nn.Module, causal: bool) -> Tuple[int, int, int]:
    """Run ``stack`` once on one token (no grad) and tag, in call order, every module that called
    the prefix attention function with :data:`PREFIX_SLOT_ATTR` = its slot. Recording the calls
    means only modules that really go through ``AttentionInterface`` and really receive the kwarg
    are tagged. Returns the stack's (layers, kv_heads, head_dim)."""
    kind = type(stack).__name__
    ids = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
    with recording_calls() as calls, torch.no_grad(), gathered_forward(stack):
        stack(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **{PREFIX_KWARG: PrefixKV()})
    if not calls:
        raise TypeError(f"{kind}'s attention layers never called the '{ATTENTION_NAMES['sdpa']}' attention "
                        "function: its attention does not go through transformers' AttentionInterface")
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


def checkpointed_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that transformers' gradient checkpointing may switch on."""
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def use_non_reentrant_checkpointing(modules: Iterable[nn.Module]) -> None:
    """Switch transformers' reentrant checkpointing on ``modules`` to non-reentrant, with a warning.

    transformers stores ``functools.partial(checkpoint, **kwargs)`` as each layer's
    ``_gradient_checkpointing_func``; ``use_reentrant`` True or absent (torch's default is True) is
    replaced by False. Other checkpoint wrappers are left alone; if they are reentrant the attention
    function refuses them (see :mod:`dept_fast.hf.attention`).
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
