"""Switching a model onto the prefix attention, and the record of it: :class:`PrefixRoute`.

``with prefix_route(model) as route:`` switches ``model`` to the prefix attention of
:mod:`dept_fast.hf.attention` (wrapping the implementation it used: sdpa, eager, flex_attention,
flash_attention_*, a kernel registered by name) and finds its
``route.stacks``, where the model's own ``forward()`` goes: it runs the model once on a few tokens,
records which modules are entered and which attention modules call the function, and takes as a
stack the innermost entered module, above all of a stack's attention layers, whose forward embeds
tokens (``GPT2Model``, ``LlamaModel``, ``OPTDecoder`` -- ``OPTForCausalLM.forward`` skips ``OPTModel``
--, an encoder-decoder's two stacks: T5's ``T5Stack``, ``BartEncoder`` / ``BartDecoder`` and their
kin; its encoder is ``get_encoder()``, its decoder's cross-attention calls are told apart from its
self-attention calls by their keys' length, the encoder's). A second run with an empty
``dept_prefix`` kwarg passed to each stack checks that every attention layer receives it, and tags
each, in call order, with its slot among its :data:`ATTENTIONS` group: self-attention layers with
:data:`~dept_fast.hf.attention.PREFIX_SLOT_ATTR`, cross-attention layers with
:data:`~dept_fast.hf.attention.PREFIX_CROSS_ATTR` (``route.layouts`` = per group (layers, kv_heads,
head_dim)). Models whose attention does not call the function, whose layers do not pass the kwarg
on, or with bidirectional self-attention outside an encoder-decoder's encoder are refused; every
change is undone if the ``with`` body raises (:func:`~dept_fast.hf.transaction.all_or_nothing`). The
route is kept on the model (attribute :data:`ROUTE_ATTR`); every adapter that passes prefix
keys/values uses the one route.
"""
import functools
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..distributed import gathered_forward
from .adapters import BASE, ROWS_KWARG, adapter_names
from .attention import (ATTENTION_NAMES, PREFIX_CROSS_ATTR, PREFIX_KWARG, PREFIX_SLOT_ATTR, Call, PrefixKV, mask_kind,
                        recording_calls, register, wrapped_implementation)
from .transaction import all_or_nothing

ROUTE_ATTR = "_dept_fast_route"
ATTENTIONS: Dict[str, str] = {"encoder": "encoder", "decoder": "decoder", "cross": "decoder"}
"""Attention group -> the stack whose pass carries its prefixes: the encoder's self-attention, the
decoder's self-attention (a causal decoder's only group), the decoder's cross-attention."""


@dataclass
class PrefixRoute:
    """A model on the prefix attention."""

    inner: str
    """The implementation the prefix attention wraps ("sdpa", "eager", "flex_attention", ...)."""
    stacks: Dict[str, nn.Module]
    """"decoder" (causal decoders) or "encoder" and "decoder" (encoder-decoders): the modules where the
    model's forward begins each stack's pass (see the module docstring)."""
    layouts: Dict[str, Tuple[int, int, int]]
    """Per attention group of :data:`ATTENTIONS` the model has ("decoder"; encoder-decoders "encoder",
    "decoder" and, where its decoder has cross-attention, "cross"), (layers, kv_heads, head_dim) of its
    tagged layers."""
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
    """Switch ``model`` onto the prefix attention (see the module docstring); a model already on it
    keeps its route."""
    existing = route_of(model)
    if existing is not None:
        yield existing
        return
    check_route(model)
    with all_or_nothing(model):
        was = model.config._attn_implementation
        inner = wrapped_implementation(was) or _switch(model, was)
        stacks, calls = _find_stacks(model)
        layouts = _tag_stacks(model, stacks, calls)
        route = PrefixRoute(inner, stacks, layouts, checkpointed_modules(model))
        yield route
        model.__dict__[ROUTE_ATTR] = route


def check_route(model: nn.Module) -> None:
    """Refuse, before anything runs, what cannot go onto the prefix attention: not a transformers model,
    an attention implementation that is not wrapped (a model already on the prefix attention passes)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    current = config._attn_implementation
    if wrapped_implementation(current) is None:
        try:
            mask_kind(current)
        except ValueError as error:
            raise ValueError(f"{type(model).__name__}: {error}") from error


def _submodels(model: nn.Module) -> List[nn.Module]:
    """The model and every submodule with its own ``set_attn_implementation`` (stacks, sub-models)."""
    return [m for m in model.modules() if hasattr(m, "set_attn_implementation") and hasattr(m, "config")]


def _set_attention(model: nn.Module, implementation: str) -> None:
    """``model.set_attn_implementation`` and, where it did not reach (transformers < 5.23 skips
    submodels whose config has the model's config class, e.g. T5's stacks), each submodel's."""
    model.set_attn_implementation(implementation)
    for submodel in _submodels(model):
        if submodel.config._attn_implementation != implementation:
            submodel.set_attn_implementation(implementation)


def _switch(model: nn.Module, current: str) -> str:
    """Switch ``model`` from ``current`` (checked by :func:`check_route`) to the prefix attention wrapping it."""
    name = register(current)
    _set_attention(model, name)
    if any(m.config._attn_implementation != name for m in _submodels(model)):
        raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                        "AttentionInterface, so prefix K/V cannot be joined to its layers")
    return current


ENCODER_TOKENS, DECODER_TOKENS = 3, 2
"""Probe lengths: an encoder-decoder's cross-attention keys (the encoder's length) differ from the
decoder's own."""


def _probe(model: nn.Module, stack_kwargs: Optional[Dict[nn.Module, dict]] = None) -> Tuple[List[Call], Set[int]]:
    """Run the model's own forward on a few tokens (no grad) and return the prefix attention calls it
    made and the ids of the modules it entered; ``stack_kwargs`` adds kwargs to those modules' calls."""
    device = next(model.parameters()).device
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids = torch.zeros((1, ENCODER_TOKENS if encoder_decoder else DECODER_TOKENS), dtype=torch.long, device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if encoder_decoder:
        inputs["decoder_input_ids"] = torch.zeros((1, DECODER_TOKENS), dtype=torch.long, device=device)
    if adapter_names(model):  # the model's adapters stay out of the probe
        inputs[ROWS_KWARG] = [BASE]
    entered: Set[int] = set()
    handles = [m.register_forward_pre_hook(lambda module, args: entered.add(id(module))) for m in model.modules()]
    for module, extra in (stack_kwargs or {}).items():
        handles.append(module.register_forward_pre_hook(
            lambda module, args, kwargs, extra=extra: (args, {**kwargs, **extra}), with_kwargs=True))
    try:
        with recording_calls() as calls, torch.no_grad(), gathered_forward(model):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, entered


def _entry(model: nn.Module, modules: Sequence[nn.Module], entered: Set[int], what: str) -> nn.Module:
    """The innermost module entered by the forward, above all of ``modules``, whose forward embeds
    tokens (takes ``input_ids`` or ``inputs_embeds``): where a stack's pass begins."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names[id(m)].split(".") if names[id(m)] else [] for m in modules]
    common = paths[0]
    for path in paths[1:]:
        shared = 0
        while shared < min(len(common), len(path)) and common[shared] == path[shared]:
            shared += 1
        common = common[:shared]
    lookup = dict(model.named_modules())
    for depth in range(len(common), -1, -1):
        module = lookup[".".join(common[:depth])]
        parameters = inspect.signature(module.forward).parameters
        if id(module) in entered and ("input_ids" in parameters or "inputs_embeds" in parameters):
            return module
    raise TypeError(f"{type(model).__name__}.forward reaches its {what} attention layers through no module that "
                    "embeds tokens (takes input_ids or inputs_embeds): no stack to pass prefix keys/values to")


def _find_stacks(model: nn.Module) -> Tuple[Dict[str, nn.Module], Dict[str, List[nn.Module]]]:
    """The model's stacks (see :attr:`PrefixRoute.stacks`), found by running its forward, and each
    stack's self-attention modules in call order."""
    kind = type(model).__name__
    calls, entered = _probe(model)
    if not calls:
        raise TypeError(f"{kind}'s attention layers never called the {model.config._attn_implementation!r} attention "
                        "function: its attention does not go through transformers' AttentionInterface")
    if not getattr(model.config, "is_encoder_decoder", False):
        modules = [module for module, _, _ in calls]
        return {"decoder": _entry(model, modules, entered, "decoder")}, {"decoder": modules}
    encoder = model.get_encoder()
    inside = {id(m) for m in encoder.modules()}
    if id(encoder) not in entered:
        raise TypeError(f"{kind}.forward does not run get_encoder() ({type(encoder).__name__})")
    outside = [(m, key) for m, key, _ in calls if id(m) not in inside]
    own = {"encoder": [m for m, _, _ in calls if id(m) in inside],
           "decoder": [m for m, key in outside if key.shape[2] != ENCODER_TOKENS],
           "cross": [m for m, key in outside if key.shape[2] == ENCODER_TOKENS]}
    decoder = _entry(model, [m for m, _ in outside], entered, "decoder")
    return {"encoder": encoder, "decoder": decoder}, {group: modules for group, modules in own.items() if modules}


def _tag_stacks(model: nn.Module, stacks: Dict[str, nn.Module],
                own: Dict[str, List[nn.Module]]) -> Dict[str, Tuple[int, int, int]]:
    """Run the model again with an empty ``dept_prefix`` kwarg given to each stack, check that every
    attention layer of each group in ``own`` receives it, tag each with its slot in its group's call
    order (:data:`PREFIX_SLOT_ATTR`; cross-attention :data:`PREFIX_CROSS_ATTR`), and return each group's
    (layers, kv_heads, head_dim)."""
    calls, _ = _probe(model, {stack: {PREFIX_KWARG: PrefixKV()} for stack in stacks.values()})
    received = {id(module): got for module, _, got in calls}
    keys = {id(module): key for module, key, _ in calls}
    layouts = {}
    for name, modules in own.items():
        kind = type(stacks[ATTENTIONS[name]]).__name__
        if not all(received.get(id(module), False) for module in modules):
            raise TypeError(f"{kind} does not pass forward keyword arguments down to its attention layers, "
                            "so it cannot receive prefix keys/values")
        if len({id(module) for module in modules}) != len(modules):
            raise TypeError(f"{kind} calls the same attention module more than once per forward (shared layers); "
                            "per-layer prefixes are not defined for it")
        if len(stacks) == 1 and not all(getattr(module, "is_causal", False) for module in modules):
            raise ValueError(f"{type(model).__name__} is not a causal decoder (its self-attention is bidirectional); "
                             "prefix attention supports causal decoders and encoder-decoders")
        shapes = {(keys[id(m)].shape[1], keys[id(m)].shape[3]) for m in modules}
        if len(shapes) != 1:
            raise ValueError(f"{kind}'s layers differ in key/value heads x head_dim {sorted(shapes)}; "
                             f"the {name} prefixes need one layout for all layers")
        for slot, module in enumerate(modules):
            setattr(module, PREFIX_CROSS_ATTR if name == "cross" else PREFIX_SLOT_ATTR, slot)
        layouts[name] = (len(modules),) + shapes.pop()
    return layouts


def check_attention_window(model: nn.Module, span: int, what: str = "the prompt") -> None:
    """Refuse (ValueError) sliding-window or chunked attention layers that can lose sight of a prefix.

    In the sequence (the prompt in every row, or PEFT's prefixes in the cache) such a layer hides the
    first positions from tokens ``window`` or more positions after them; the prefix attention joins
    its keys/values to every token's attention, so the two agree only when the window covers all
    ``span`` positions (m + max_length for a shared prompt, p + the sequence for prefixes)."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if "chunked_attention" in layer_types:
        raise ValueError(f"{type(model).__name__} has chunked attention layers, which hide {what} from "
                         "later chunks")
    window = getattr(config, "sliding_window", None)
    if window is not None and (not layer_types or "sliding_attention" in layer_types) and window < span:
        raise ValueError(f"{type(model).__name__} has sliding-window attention layers (window {window}), which hide "
                         f"{what} from tokens {window} or more positions after it; {what} and the tokens span "
                         f"{span} positions")


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
