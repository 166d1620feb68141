"""Attaching an adapter to a transformers model, and what every adapter's hooks share.

:func:`attach` is the one place that freezes the model, registers the adapter as a submodule,
records its config in ``model.config`` (so a whole-model save can be reloaded as an adapter) and
registers its hooks. :func:`forward_arguments` turns a pre-hook's (args, kwargs) into kwargs by
name; :func:`prefix_pass` sets up one pass with prefix keys/values.
"""
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.whole_model import MODEL_CONFIG_KEY
from .adapters import CONTAINERS, add_adapter
from .attention import PREFIX_KWARG, KeyValue, PrefixKV
from .positions import cached_length, token_positions

Hook = Tuple[nn.Module, str, Callable]
"""(module, "pre" or "post", hook): a forward pre-hook or forward hook, both ``with_kwargs=True``; a
forward hook runs even when the forward raises (``always_call``), so it can end what a pre-hook began."""


def attach(model: nn.Module, kind: str, name: str, adapter: nn.Module, config: Dict[str, Any],
           hooks: Callable[[], List[Hook]]) -> nn.Module:
    """Freeze ``model`` if it is a plain one, register ``adapter`` as adapter ``name`` of ``kind`` (its
    parameters stay trainable; see :mod:`dept_fast.hf.adapters`), record ``config`` under
    ``model.config.dept_fast[kind][name]``, and register ``hooks()`` if it is the model's first
    adapter of this kind (one set of hooks serves all adapters of a kind).

    A plain model (every parameter trainable, as built or loaded) has its base frozen. A model where
    something is frozen already has its trainable parameters chosen (PEFT's LoRA, a user's choice, the
    first adapter's freezing): its flags are kept, so nothing made trainable is frozen."""
    adapters = {id(p) for container in CONTAINERS.values() if container in model._modules
                for p in model._modules[container].parameters()}
    adapters |= {id(p) for p in adapter.parameters()}  # the new adapter's, and what it wraps (it froze E)
    base = [p for p in model.parameters() if id(p) not in adapters]
    if all(p.requires_grad for p in base):
        for p in base:
            p.requires_grad_(False)
    first = add_adapter(model, kind, name, adapter)
    records = dict(getattr(model.config, MODEL_CONFIG_KEY, {}))
    records[kind] = {**records.get(kind, {}), name: config}
    setattr(model.config, MODEL_CONFIG_KEY, records)
    for module, when, hook in hooks() if first else ():
        if when == "pre":
            module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            module.register_forward_hook(hook, with_kwargs=True, always_call=True)
    return model


def forward_arguments(signature: inspect.Signature, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A forward pre-hook's (args, kwargs) as one dict by parameter name (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return dict(bound)


def prefix_pass(kwargs: Dict[str, Any], key_values: Optional[Sequence[KeyValue]] = None,
                source: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                capture: Optional[Dict[int, KeyValue]] = None, shift_positions: bool = True,
                state: Any = None) -> Dict[str, Any]:
    """A stack's forward kwargs (by name) for one pass through the prefix attention: ``dept_prefix``
    set to a :class:`PrefixKV` (``key_values``, ``source``, ``valid`` as documented there), and with
    ``key_values`` and ``shift_positions`` (stacks with absolute or rotary positions, not T5)
    ``position_ids`` = the tokens' positions + the length of the row's prefix (a caller's
    ``position_ids`` are shifted too). A :class:`PrefixKV` already in ``kwargs`` (an outer hook's,
    e.g. the shared prompts of other rows of a mixed batch) is merged into one: each row attends to
    its one source."""
    spec = PrefixKV(key_values, source, valid, capture, torch.is_grad_enabled(), state)
    inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch = inputs.shape[0]
    if key_values and shift_positions:
        mask = kwargs.get("attention_mask")
        positions = token_positions(batch, inputs.shape[1], inputs.device,
                                    mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                                    kwargs.get("position_ids"), cached_length(kwargs))
        lengths = spec.row_valid(batch)
        offsets = key_values[0][0].shape[2] if lengths is None else lengths.sum(-1, keepdim=True)
        kwargs = {**kwargs, "position_ids": positions + offsets}
    outer = kwargs.get(PREFIX_KWARG)
    if outer is not None:
        spec = _merge(outer, spec, batch)
    return {**kwargs, PREFIX_KWARG: spec}


def _merge(outer: PrefixKV, inner: PrefixKV, batch: int) -> PrefixKV:
    """One :class:`PrefixKV`: ``outer``'s capture and state, and as sources ``outer``'s followed by
    ``inner``'s, padded to the longer (a row of a mixed batch takes its one source)."""
    merged = PrefixKV(inner.key_values, inner.source, inner.valid, outer.capture, outer.grad_enabled, outer.state)
    if not outer.key_values:
        return merged
    n_outer, _, p_outer, _ = outer.key_values[0][0].shape
    width = max(p_outer, inner.key_values[0][0].shape[2])
    device = outer.key_values[0][0].device

    def widened(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, width - t.shape[2]))

    def source_valid(spec: PrefixKV) -> torch.Tensor:
        n, _, p, _ = spec.key_values[0][0].shape
        valid = spec.valid if spec.valid is not None else torch.ones(n, p, dtype=torch.bool, device=device)
        return F.pad(valid, (0, width - p))

    def row_source(spec: PrefixKV) -> torch.Tensor:
        return spec.source if spec.source is not None else torch.zeros(batch, dtype=torch.long, device=device)

    merged.key_values = [tuple(torch.cat([widened(a), widened(b)]) for a, b in zip(o, i))
                         for o, i in zip(outer.key_values, inner.key_values)]
    merged.valid = torch.cat([source_valid(outer), source_valid(inner)])
    merged.source = torch.where(row_source(inner) >= 0, row_source(inner) + n_outer, row_source(outer))
    return merged
