"""Prefix-Tuning on a transformers model: ``apply_prefix_tuning``, ``load_prefix_tuning``.

The adapter, :class:`~dept_fast.modules.prefix_tuning.PrefixTuning`, is registered on the model as
``model.prefix_tuning``: one :class:`FusedPrefixEncoder` per attention stack (``"decoder"`` for
GPT-2, Llama and other causal decoders; ``"encoder"`` and ``"decoder"`` for T5, the paper's encoder
and decoder prefixes, on the encoder's and the decoder's self-attention; Li & Liang's code's third
prefix, on the decoder's cross-attention, is not implemented). The base model is frozen and keeps
its class, forward signature and ``generate()``. A forward pre-hook on each stack evaluates its
encoder and passes the per-layer prefixes to the prefix attention (:mod:`dept_fast.hf.attention`)
as the ``dept_prefix`` kwarg, with ``position_ids`` starting at p (:mod:`dept_fast.hf.positions`).
Checkpoint formats: :mod:`dept_fast.checkpoint.prefix`.
"""
import inspect
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.prefix import PrefixCheckpoint, adapter_config, read_prefix_checkpoint
from ..distributed import refuse_sharded, zero3_module
from ..modules.prefix_encoder import FusedPrefixEncoder
from ..modules.prefix_tuning import PrefixTuning
from .adapters import DEPT, PREFIX, adapters_of, call_names, refuse_taken, row_adapters
from .attach import attach, forward_arguments, prefix_pass
from .attention import PREFIX_KWARG, PREFIX_SLOT_ATTR, KeyValue
from .dept import DEFAULT_NAME, decoder_inputs
from .peft_models import attach_through
from .positions import (CACHE_KWARGS, EndDecoderOffset, ShiftPositions, cached_length, positions_module,
                        set_decoder_offset)
from .route import PrefixRoute, check_attention_window, check_route, prefix_route
from .transaction import all_or_nothing
from .verify import PrefixProbe, Refused, own_random_numbers, plain_call

PathLike = Union[str, os.PathLike]


def apply_prefix_tuning(model: nn.Module, prefix_len: int, projection_dim: Optional[int] = 512,
                        adapter_name: str = DEFAULT_NAME) -> nn.Module:
    """Freeze ``model`` and attach fresh Prefix-Tuning prefixes (``model.prefix_adapters[adapter_name]``;
    ``model.prefix_tuning`` while its name is the active one).

    Args:
        model: a transformers causal decoder whose attention goes through ``AttentionInterface``
            (GPT-2, Llama with or without grouped-query attention, ...) or T5, built with
            ``attn_implementation`` "sdpa" (default) or "eager"; prefix attention wraps that one.
        prefix_len: p, prefix slots per attention layer.
        projection_dim: width of the reparameterization MLP (Embedding(p, d) -> Linear(d, mid) ->
            tanh -> Linear(mid, layers * 2 * kv_heads * head_dim), d the model's hidden size), or
            None to train the prefixes directly.
        adapter_name: the adapter's name; a call picks one per row with ``adapter_names=[...]``
            (:mod:`dept_fast.hf.adapters`). A DePT adapter of the same name acts together with it
            (its prompt in every row only).

    Returns:
        The same model object, called as before (``input_ids``, ``attention_mask``, ``labels``,
        ``generate``, plus ``adapter_names``); only the adapters' parameters require grad. Works with
        ``model.gradient_checkpointing_enable()``; reentrant checkpointing is switched to
        non-reentrant with a warning.
    """
    def attach_to(target: nn.Module) -> nn.Module:
        refuse_sharded(target)
        return _attach(target, adapter_name, (prefix_len, projection_dim))

    return attach_through(model, attach_to)


def load_prefix_tuning(model: nn.Module, path: PathLike, adapter_name: str = DEFAULT_NAME) -> nn.Module:
    """Freeze ``model`` and attach the prefixes saved in directory ``path`` as ``adapter_name``: our
    format (:meth:`PrefixTuning.save_pretrained`), a PEFT ``PREFIX_TUNING`` checkpoint, or a
    whole-model save of a model with prefixes (``model.save_pretrained``, the HF Trainer; its
    adapter of that name). Raises ValueError when the checkpoint's layers, heads or head width do
    not match the model's."""
    def attach_to(target: nn.Module) -> nn.Module:
        refuse_sharded(target)
        refuse_taken(target, PREFIX, adapter_name)
        encoder_decoder = bool(getattr(target.config, "is_encoder_decoder", False))
        return _attach(target, adapter_name, read_prefix_checkpoint(path, encoder_decoder, adapter_name))

    return attach_through(model, attach_to)


def _hidden_size(model: nn.Module) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _attach(model: nn.Module, name: str, spec: Union[Tuple[int, Optional[int]], PrefixCheckpoint]) -> nn.Module:
    """Attach fresh prefixes (``spec`` = (prefix_len, projection_dim)) or a checkpoint's, and verify them
    (:mod:`dept_fast.hf.verify`), all or nothing."""
    refuse_taken(model, PREFIX, name)
    dept = adapters_of(model, DEPT)[name] if name in adapters_of(model, DEPT) else None
    if getattr(dept, "share_prompt", False):
        raise ValueError(f"{type(model).__name__} has a DePT adapter named {name!r} sharing its prompt's keys/values, "
                         "which take the same attention argument as prefixes; attach DePT with share_prompt=False to "
                         "combine them, or the prefixes under another name")
    check_route(model)
    probe = PrefixProbe.prepare(model)
    with all_or_nothing(model):
        with prefix_route(model) as route:
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            if isinstance(spec, PrefixCheckpoint):
                adapter = _from_checkpoint(spec, route.layouts, device)
            else:
                prefix_len, projection_dim = spec
                adapter = PrefixTuning({stack: FusedPrefixEncoder(prefix_len, *layout, projection_dim=projection_dim,
                                                                  embed_dim=_hidden_size(model), dtype=dtype,
                                                                  device=device)
                                        for stack, layout in route.layouts.items()})
        hooks = lambda: [(stack, "pre", StackPrefixes(model, stack_name, stack, route))  # noqa: E731
                         for stack_name, stack in route.stacks.items()] + _decoder_position_hooks(model, route)
        attach(model, PREFIX, name, adapter, adapter_config(adapter).to_json(), hooks)
        if not model.config.is_encoder_decoder:
            decoder_inputs(model)  # a left-padded row's first label, as for DePT rows
        if probe is not None:
            try:
                probe.verify(model, _probe_prefixes(route, device, dtype, adapter),
                             lambda ids, a: _cache_reference(model, ids, a, probe.decoder))
            except Refused as error:
                fixed = [type(stack).__name__ for stack in route.stacks.values()
                         if "position_ids" not in inspect.signature(stack.forward).parameters]
                if fixed and not model.config.is_encoder_decoder:
                    raise Refused(f"{error}; {', '.join(fixed)}.forward takes no position_ids, so its tokens cannot "
                                  "be placed after the prefix (at positions p, p + 1, ...)") from error
                if adapter.positions == "cache" and model.config.is_encoder_decoder \
                        and _decoder_positions(route) is None:
                    raise Refused(f"{error}; no submodule of {type(route.stacks['decoder']).__name__} outside its "
                                  "attention layers takes position_ids, so its tokens cannot be placed after the "
                                  "prefix (the 'cache' position convention of PEFT's encoder-decoder prefixes)"
                                  ) from error
                raise
    return model


def _probe_prefixes(route: PrefixRoute, device: torch.device, dtype: torch.dtype,
                    adapter: PrefixTuning) -> PrefixTuning:
    """Random prefixes of 2 slots, for the self-check: on every stack of the route, or for an adapter
    of the "cache" position convention on its stacks, with that convention."""
    stacks = adapter.encoders if adapter.positions is not None else route.layouts
    with own_random_numbers(device):
        return PrefixTuning({stack: FusedPrefixEncoder(2, *route.layouts[stack], projection_dim=None, dtype=dtype,
                                                       device=device) for stack in stacks}, adapter.positions)


def _cache_reference(model: nn.Module, ids: torch.Tensor, adapter: PrefixTuning,
                     decoder: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The logits of the plain model with ``adapter``'s decoder prefixes in a pre-filled cache (PEFT's
    route, the tokens at positions p + i): a causal decoder's ``DynamicCache``, or for an
    encoder-decoder adapter of the "cache" position convention the self-attention part of an
    ``EncoderDecoderCache`` whose cross-attention part is empty, as PEFT builds it. None where that
    route does not exist (an encoder-decoder's own convention) or the model does not take a
    pre-filled cache."""
    encoder_decoder = bool(model.config.is_encoder_decoder)
    if encoder_decoder and adapter.positions != "cache":
        return None
    from transformers import DynamicCache, EncoderDecoderCache

    key_values = adapter.encoders["decoder"].key_values()
    try:
        cache = DynamicCache() if encoder_decoder else DynamicCache(config=model.config)
        for layer, (key, value) in enumerate(key_values):
            cache.update(key, value, layer)
        if encoder_decoder:
            cache = EncoderDecoderCache(cache, DynamicCache())
            mask = torch.ones_like(ids)
        else:
            mask = torch.ones(1, key_values[0][0].shape[2] + ids.shape[1], dtype=torch.long, device=ids.device)
        name = CACHE_KWARGS[0] if CACHE_KWARGS[0] in inspect.signature(model.forward).parameters else CACHE_KWARGS[1]
        output = plain_call(model, input_ids=ids, attention_mask=mask, use_cache=True, **decoder, **{name: cache})
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, NotImplementedError):
        return None
    return output.logits if hasattr(output, "logits") else output[0]


class StackPrefixes:
    """Forward pre-hook of one stack: guard the pass, find each row's prefix adapter, evaluate the
    stack's prefixes and pass them as the kwarg (a callable object, so ``copy.deepcopy(model)`` maps
    it onto the copy's adapters). In a mixed batch, each prefix adapter's prefixes are evaluated
    once and the rows gather theirs in the attention."""

    def __init__(self, model: nn.Module, name: str, stack: nn.Module, route: PrefixRoute) -> None:
        self.model, self.name, self.route = model, name, route
        self.signature = inspect.signature(stack.forward)
        self.shift_positions = "position_ids" in self.signature.parameters
        # an encoder-decoder's decoder whose positions move under the "cache" convention (BART family)
        self.moves_positions = bool(model.config.is_encoder_decoder) and name == "decoder" \
            and _decoder_positions(route) is not None

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
        self.route.begin_pass(module)
        kwargs = forward_arguments(self.signature, args, kwargs)
        inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        rows = row_adapters(self.model, PREFIX, call_names(kwargs), inputs.shape[0], inputs.device)
        if not rows.adapters:
            return (), kwargs
        positions = position_convention(self.model, rows.adapters)
        having = [adapter for adapter in rows.adapters if self.name in adapter.encoders]
        if not having:
            return (), kwargs
        if len(having) != len(rows.adapters):
            raise ValueError(f"this batch's rows take prefix adapters of which only some have {self.name} prefixes; "
                             "call such adapters in separate batches")
        longest = max(adapter.encoders[self.name].prefix_len for adapter in rows.adapters)
        check_attention_window(self.model, longest + cached_length(kwargs) + inputs.shape[1], "the prefix")
        if rows.uniform:
            key_values, valid = zero3_module(rows.adapters[0].encoders[self.name]).key_values(), None
        else:
            key_values, valid = pack_prefixes([zero3_module(a.encoders[self.name]).key_values() for a in rows.adapters])
        kwargs = prefix_pass(kwargs, key_values, rows.index, valid, shift_positions=self.shift_positions)
        if positions == "cache" and self.model.config.is_encoder_decoder:
            kwargs[PREFIX_KWARG].positions = cached_length(kwargs)
            if self.moves_positions:
                set_decoder_offset(_uniform_offset(rows, self.name))
        return (), kwargs


def _decoder_positions(route: PrefixRoute) -> Optional[nn.Module]:
    """The encoder-decoder's decoder positions module (:func:`~dept_fast.hf.positions.positions_module`)."""
    decoder = route.stacks["decoder"]
    return positions_module(decoder, [m for m in decoder.modules() if hasattr(m, PREFIX_SLOT_ATTR)])


def _decoder_position_hooks(model: nn.Module, route: PrefixRoute) -> List[Tuple[nn.Module, str, Any]]:
    """An encoder-decoder's hooks that move its decoder's positions under the "cache" convention (BART
    family: after the prefix), where the decoder has a positions module; none otherwise."""
    module = _decoder_positions(route) if model.config.is_encoder_decoder else None
    if module is None:
        return []
    return [(module, "pre", ShiftPositions(module)), (route.stacks["decoder"], "post", EndDecoderOffset())]


def _uniform_offset(rows, stack: str) -> int:
    """The prefix length every row of the batch shares (a decoder whose positions module takes one
    row of positions for the whole batch); a batch whose rows' prefix lengths differ is refused."""
    lengths = {adapter.encoders[stack].prefix_len for adapter in rows.adapters}
    plain = rows.index is not None and bool((rows.index < 0).any())
    if len(lengths) > 1 or plain:
        raise ValueError(f"this batch's rows have decoder prefixes of lengths {sorted(lengths)}"
                         f"{' and plain rows (none)' if plain else ''} under the 'cache' position convention, where "
                         "the decoder's tokens sit after the prefix; this decoder gives one row of positions to the "
                         "whole batch, so call rows of different prefix lengths in separate batches")
    return lengths.pop()


def position_convention(model: nn.Module, adapters: Sequence[PrefixTuning]) -> Optional[str]:
    """The one position convention of the adapters a batch's rows take (see
    :class:`~dept_fast.checkpoint.config.PrefixTuningConfig`); a batch mixing conventions is refused."""
    conventions = {adapter.positions for adapter in adapters}
    if len(conventions) > 1:
        names = {name: adapter.positions for name, adapter in adapters_of(model, PREFIX).items()
                 if any(adapter is a for a in adapters)}
        raise ValueError(f"this batch's rows take prefix adapters of different position conventions {names} (None: "
                         "the prefix has no position; 'cache': PEFT's, the decoder's tokens after the prefix); "
                         "call them in separate batches")
    return conventions.pop()


def pack_prefixes(per_adapter: List[List[KeyValue]]) -> Tuple[List[KeyValue], torch.Tensor]:
    """Several adapters' per-layer prefixes (each (1, kv_heads, p_a, head_dim)) as one source per
    adapter: per layer (n, kv_heads, P, head_dim) zero-padded after each to the longest P, and
    (n, P) bool marking the real slots."""
    longest = max(layers[0][0].shape[2] for layers in per_adapter)

    def padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, longest - t.shape[2]))

    key_values = [tuple(torch.cat([padded(pair[i]) for pair in slot]) for i in range(2)) for slot in zip(*per_adapter)]
    lengths = torch.tensor([layers[0][0].shape[2] for layers in per_adapter], device=key_values[0][0].device)
    return key_values, torch.arange(longest, device=lengths.device) < lengths[:, None]


def _from_checkpoint(checkpoint: PrefixCheckpoint, layouts: Dict[str, Tuple[int, int, int]],
                     device: torch.device) -> PrefixTuning:
    """The checkpoint's encoders, built on the meta device (nothing allocated) and then given the
    checkpoint's tensors as they are (their dtype kept), on ``device``."""
    _check_layouts(checkpoint, layouts)
    encoders = {}
    for name, stack in checkpoint.config.stacks.items():
        layout = layouts[name]
        dtype = next(t.dtype for key, t in checkpoint.tensors.items() if key.startswith(f"{name}."))
        encoders[name] = FusedPrefixEncoder(checkpoint.config.prefix_len, *layout, projection_dim=stack.projection_dim,
                                            embed_dim=stack.embed_dim, dtype=dtype, device="meta")
    adapter = PrefixTuning(encoders, checkpoint.config.positions)
    adapter.encoders.load_state_dict({key: t.to(device) for key, t in checkpoint.tensors.items()}, assign=True)
    return adapter


def _check_layouts(checkpoint: PrefixCheckpoint, model: Dict[str, Tuple[int, int, int]]) -> None:
    """Every group the checkpoint has a prefix for exists in the model with the same layout."""
    for name, stack in checkpoint.config.stacks.items():
        if stack.layout != model.get(name):
            raise ValueError(
                f"{checkpoint.source} does not fit this model: {name} prefixes (layers, kv_heads, head_dim) = "
                f"{stack.layout} in the checkpoint, {model.get(name)} in the model (its attention groups: "
                f"{dict(model)})")
    if checkpoint.config.positions == "cache" and set(checkpoint.config.stacks) != {"decoder"}:
        raise ValueError(f"{checkpoint.source} has prefixes on {sorted(checkpoint.config.stacks)} with the 'cache' "
                         "position convention, which places a prefix on the decoder's self-attention only (PEFT's "
                         "pre-filled cache); it cannot be loaded")
