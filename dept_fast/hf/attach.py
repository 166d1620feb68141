"""Attaching an adapter to a transformers model, and what every adapter's hooks share.

:func:`attach` is the one place that freezes the model, registers the adapter as a submodule,
records its config in ``model.config`` (so a whole-model save can be reloaded as an adapter) and
registers its hooks. :func:`forward_arguments` turns a pre-hook's (args, kwargs) into kwargs by
name; :func:`prefix_pass` sets up one pass with prefix keys/values.
"""
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint.dept import MODEL_CONFIG_KEY
from .attention import PREFIX_KWARG, KeyValue, PrefixKV
from .positions import cached_length, token_positions

Hook = Tuple[nn.Module, str, Callable]
"""(module, "pre" or "post", hook): a forward pre-hook or forward hook, both ``with_kwargs=True``."""


def attach(model: nn.Module, name: str, adapter: nn.Module, config: Dict[str, Any], hooks: List[Hook]) -> nn.Module:
    """Freeze ``model``, register ``adapter`` as ``model.<name>`` (its parameters stay trainable),
    record ``config`` under ``model.config.dept_fast[name]`` and register ``hooks``."""
    model.requires_grad_(False)  # before the adapter joins: its own parameters keep their flags
    model.add_module(name, adapter)
    setattr(model.config, MODEL_CONFIG_KEY, {**getattr(model.config, MODEL_CONFIG_KEY, {}), name: config})
    for module, kind, hook in hooks:
        if kind == "pre":
            module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            module.register_forward_hook(hook, with_kwargs=True)
    return model


def forward_arguments(signature: inspect.Signature, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A forward pre-hook's (args, kwargs) as one dict by parameter name (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return dict(bound)


def prefix_pass(kwargs: Dict[str, Any], key_values: Optional[Sequence[KeyValue]] = None,
                capture: Optional[Dict[int, KeyValue]] = None, shift_positions: bool = True,
                state: Any = None) -> Dict[str, Any]:
    """A stack's forward kwargs (by name) for one pass through the prefix attention: ``dept_prefix``
    set (:class:`PrefixKV`), and with ``key_values`` and ``shift_positions`` (stacks with absolute or
    rotary positions, not T5) ``position_ids`` = the tokens' positions + p (a caller's
    ``position_ids`` are shifted by p)."""
    kwargs = {**kwargs, PREFIX_KWARG: PrefixKV(key_values, capture, grad_enabled=torch.is_grad_enabled(), state=state)}
    if key_values and shift_positions:
        inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        positions = token_positions(inputs.shape[0], inputs.shape[1], inputs.device,
                                    mask if mask is not None and mask.dim() == 2 else None,
                                    kwargs.get("position_ids"), cached_length(kwargs))
        kwargs["position_ids"] = positions + key_values[0][0].shape[2]
    return kwargs
