"""Prefix-Tuning on a transformers model: ``apply_prefix_tuning``, ``load_prefix_tuning``.

The adapter, :class:`~dept_fast.modules.prefix_tuning.PrefixTuning`, is registered on the model as
``model.prefix_tuning``: one :class:`FusedPrefixEncoder` per attention group
(:data:`~dept_fast.hf.route.ATTENTIONS`): ``"decoder"`` for GPT-2, Llama and other causal decoders;
for encoder-decoders (T5, BART, mBART, M2M100, Pegasus, Marian, ...) Li & Liang's three, ``"encoder"``
(the encoder's self-attention), ``"decoder"`` (the decoder's self-attention) and ``"cross"`` (the
decoder's cross-attention), or those chosen with ``attentions=``. The base model is frozen and keeps
its class, forward signature and ``generate()``. A forward pre-hook on each stack evaluates the
prefixes its pass carries and passes them to the prefix attention (:mod:`dept_fast.hf.attention`) as
the ``dept_prefix`` kwarg. Positions: in a causal decoder the tokens sit after the prefix
(``position_ids`` starting at p, :mod:`dept_fast.hf.positions`), as PEFT's pre-filled cache puts
them; in an encoder-decoder the prefix has no position (tokens keep theirs, T5's position bias gives
the prefix columns none), as in Li & Liang's BART code, except for an adapter of the "cache" position
convention (PEFT's encoder-decoder checkpoints): its decoder prefix sits at positions 0..p-1 and the
decoder's tokens after it (T5: bias columns of keys 0..p-1 for queries at p + i,
:func:`~dept_fast.hf.attention.join_position_bias`; BART family: the decoder's positions module
moved by p, :class:`~dept_fast.hf.positions.ShiftPositions`).
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
from ..modules.prefix_encoder import FusedPrefixEncoder, grouped_key_values
from ..modules.prefix_tuning import PrefixTuning
from .adapters import DEPT, PREFIX, adapters_of, call_names, refuse_taken, row_adapters
from .attach import attach, forward_arguments, prefix_pass
from .attention import PREFIX_CROSS_ATTR, PREFIX_KWARG, PREFIX_SLOT_ATTR, KeyValue, PrefixKV
from .dept import DEFAULT_NAME, decoder_inputs
from .peft_models import attach_through
from .positions import (CACHE_KWARGS, EndDecoderOffset, ShiftPositions, cached_length, positions_module,
                        set_decoder_offset)
from .route import ATTENTIONS, PrefixRoute, check_attention_window, check_route, prefix_route
from .transaction import all_or_nothing
from .verify import PrefixProbe, Refused, own_random_numbers, plain_call

PathLike = Union[str, os.PathLike]


def apply_prefix_tuning(model: nn.Module, prefix_len: int, projection_dim: Optional[int] = 512,
                        adapter_name: str = DEFAULT_NAME, attentions: Optional[Sequence[str]] = None) -> nn.Module:
    """Freeze ``model`` and attach fresh Prefix-Tuning prefixes (``model.prefix_adapters[adapter_name]``;
    ``model.prefix_tuning`` while its name is the active one).

    Args:
        model: a transformers causal decoder or encoder-decoder whose attention goes through
            ``AttentionInterface`` (GPT-2, Llama with or without grouped-query attention, T5, BART,
            ...), with any attention implementation the prefix attention wraps (sdpa, eager, ...).
        prefix_len: p, prefix slots per attention layer.
        projection_dim: width of each reparameterization MLP (Embedding(p, d) -> Linear(d, mid) ->
            tanh -> Linear(mid, layers * 2 * kv_heads * head_dim), d the model's hidden size), or
            None to train the prefixes directly.
        attentions: which attention groups get a prefix, each from its own MLP: a subset of
            ``("encoder", "decoder", "cross")`` for an encoder-decoder (default: all three, the
            paper's), ``("decoder",)`` for a causal decoder (the default).
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
        return _attach(target, adapter_name, (prefix_len, projection_dim, attentions))

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


FreshPrefixes = Tuple[int, Optional[int], Optional[Sequence[str]]]
"""(prefix_len, projection_dim, attentions) of :func:`apply_prefix_tuning`."""


def _attach(model: nn.Module, name: str, spec: Union[FreshPrefixes, PrefixCheckpoint]) -> nn.Module:
    """Attach fresh prefixes or a checkpoint's, and verify them (:mod:`dept_fast.hf.verify`), all or nothing."""
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
                prefix_len, projection_dim, attentions = spec
                adapter = PrefixTuning({group: FusedPrefixEncoder(prefix_len, *route.layouts[group],
                                                                  projection_dim=projection_dim,
                                                                  embed_dim=_hidden_size(model), dtype=dtype,
                                                                  device=device)
                                        for group in _chosen(model, route, attentions)})
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


def _chosen(model: nn.Module, route: PrefixRoute, attentions: Optional[Sequence[str]]) -> List[str]:
    """The attention groups ``attentions`` names (None: all the route has), checked against the route."""
    if attentions is None:
        return list(route.layouts)
    if isinstance(attentions, str) or not attentions:
        raise ValueError(f"attentions must be a non-empty sequence of attention groups, e.g. {tuple(route.layouts)}; "
                         f"got {attentions!r}")
    unknown = [group for group in attentions if group not in route.layouts]
    if unknown:
        what = {"encoder": "an encoder", "decoder": "a decoder", "cross": "cross-attention"}
        missing = ", ".join(f"{g!r} ({what[g]})" if g in what else repr(g) for g in unknown)
        raise ValueError(f"{type(model).__name__} has no attention group {missing} to put a prefix on; its groups "
                         f"are {tuple(route.layouts)}")
    return list(dict.fromkeys(attentions))


def _probe_prefixes(route: PrefixRoute, device: torch.device, dtype: torch.dtype,
                    adapter: PrefixTuning) -> PrefixTuning:
    """Random prefixes of 2 slots, for the self-check: on every attention group of the route, or for an
    adapter of the "cache" position convention on its groups, with that convention."""
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
    prefixes of the stack's attention groups (a decoder's self- and cross-attention) and pass them as
    the kwarg (a callable object, so ``copy.deepcopy(model)`` maps it onto the copy's adapters). In a
    mixed batch, each prefix adapter's prefixes are evaluated once and the rows gather theirs in the
    attention; a row whose adapter has no prefix on a group attends to none there."""

    def __init__(self, model: nn.Module, name: str, stack: nn.Module, route: PrefixRoute) -> None:
        self.model, self.name, self.route = model, name, route
        self.groups = [group for group in route.layouts if ATTENTIONS[group] == name]
        self.signature = inspect.signature(stack.forward)
        # an encoder-decoder's prefix has no position (see the module docstring)
        self.shift_positions = "position_ids" in self.signature.parameters and not model.config.is_encoder_decoder
        # an encoder-decoder's decoder whose positions move under the "cache" convention (BART family)
        self.moves_positions = bool(model.config.is_encoder_decoder) and name == "decoder" \
            and _decoder_positions(route) is not None

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
        self.route.begin_pass(module)
        kwargs = forward_arguments(self.signature, args, kwargs)
        inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        rows = row_adapters(self.model, PREFIX, call_names(kwargs), inputs.shape[0], inputs.device)
        wanted = [(i, group) for group in self.groups for i, adapter in enumerate(rows.adapters)
                  if group in adapter.encoders]
        if not wanted:
            return (), kwargs
        positions = position_convention(self.model, rows.adapters)
        if self.name in self.groups and not self.model.config.is_encoder_decoder:
            longest = max(rows.adapters[i].encoders[self.name].prefix_len for i, group in wanted if group == self.name)
            check_attention_window(self.model, longest + cached_length(kwargs) + inputs.shape[1], "the prefix")
        # one grouped launch for the encoders of one shape (a decoder's self- and cross-attention prefixes)
        evaluated = dict(zip(wanted, grouped_key_values([zero3_module(rows.adapters[i].encoders[group])
                                                         for i, group in wanted])))
        specs = {group: _group_prefixes(rows, group, evaluated) for group in self.groups}
        own = specs.get(self.name) or (None, None, None)
        kwargs = prefix_pass(kwargs, *own, shift_positions=self.shift_positions)
        if specs.get("cross") is not None:
            kwargs[PREFIX_KWARG].cross = PrefixKV(*specs["cross"], grad_enabled=torch.is_grad_enabled())
        if positions == "cache" and self.model.config.is_encoder_decoder:
            kwargs[PREFIX_KWARG].positions = cached_length(kwargs)
            if self.moves_positions:
                if torch.compiler.is_compiling():
                    raise RuntimeError(f"{type(module).__name__}'s positions move after a 'cache' convention prefix "
                                       "(PEFT's) through a per-call offset that torch.compile cannot trace; run "
                                       "this adapter uncompiled")
                set_decoder_offset(_uniform_offset(rows, self.name))
        return (), kwargs


def _group_prefixes(rows, group: str, evaluated: Dict[Tuple[int, str], List[KeyValue]]
                    ) -> Optional[Tuple[List[KeyValue], Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """(key_values, source, valid) of one attention group for a :class:`PrefixKV` (None: no row's
    adapter has a prefix there): the rows' adapters that have one become its sources, in order; rows
    of the other adapters, or of none, take source -1."""
    having = [i for i in range(len(rows.adapters)) if (i, group) in evaluated]
    if not having:
        return None
    if len(having) == 1:
        key_values, valid = evaluated[having[0], group], None
    else:
        key_values, valid = pack_prefixes([evaluated[i, group] for i in having])
    source = rows.index
    if source is not None and len(having) != len(rows.adapters):
        remap = torch.full((len(rows.adapters) + 1,), -1, dtype=torch.long, device=source.device)
        remap[torch.tensor(having, device=source.device)] = torch.arange(len(having), device=source.device)
        source = remap[source]  # index -1 (no adapter) reads the last entry, -1
    return key_values, source, valid


def _decoder_positions(route: PrefixRoute) -> Optional[nn.Module]:
    """The encoder-decoder's decoder positions module (:func:`~dept_fast.hf.positions.positions_module`)."""
    decoder = route.stacks["decoder"]
    return positions_module(decoder, [m for m in decoder.modules()
                                      if hasattr(m, PREFIX_SLOT_ATTR) or hasattr(m, PREFIX_CROSS_ATTR)])


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
    for name, layout in layouts.items():  # the model's order of groups
        stack = checkpoint.config.stacks.get(name)
        if stack is None:
            continue
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
