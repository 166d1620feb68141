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
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from ..checkpoint.prefix import PrefixCheckpoint, adapter_config, read_prefix_checkpoint
from ..modules.prefix_encoder import FusedPrefixEncoder
from ..modules.prefix_tuning import PrefixTuning
from .attach import attach, forward_arguments, prefix_pass
from .dept import PREFIX_TUNING_USER, SHARED_PROMPT_USER
from .route import PrefixRoute, prefix_route, route_of

ADAPTER_NAME = "prefix_tuning"

PathLike = Union[str, os.PathLike]


def apply_prefix_tuning(model: nn.Module, prefix_len: int, projection_dim: Optional[int] = 512) -> nn.Module:
    """Freeze ``model`` and attach fresh Prefix-Tuning prefixes (``model.prefix_tuning``).

    Args:
        model: a transformers causal decoder whose attention goes through ``AttentionInterface``
            (GPT-2, Llama with or without grouped-query attention, ...) or T5, built with
            ``attn_implementation`` "sdpa" (default) or "eager"; prefix attention wraps that one.
        prefix_len: p, prefix slots per attention layer.
        projection_dim: width of the reparameterization MLP (Embedding(p, d) -> Linear(d, mid) ->
            tanh -> Linear(mid, layers * 2 * kv_heads * head_dim), d the model's hidden size), or
            None to train the prefixes directly.

    Returns:
        The same model object, called as before (``input_ids``, ``attention_mask``, ``labels``,
        ``generate``); only ``model.prefix_tuning``'s parameters require grad. Works with
        ``model.gradient_checkpointing_enable()``; reentrant checkpointing is switched to
        non-reentrant with a warning.
    """
    return _attach(model, (prefix_len, projection_dim))


def load_prefix_tuning(model: nn.Module, path: PathLike) -> nn.Module:
    """Freeze ``model`` and attach the prefixes saved in directory ``path``: our format
    (:meth:`PrefixTuning.save_pretrained`), a PEFT ``PREFIX_TUNING`` checkpoint, or a whole-model
    save of a model with prefixes (``model.save_pretrained``, the HF Trainer). Raises ValueError
    when the checkpoint's layers, heads or head width do not match the model's."""
    _refuse_second(model)
    return _attach(model, read_prefix_checkpoint(path, bool(getattr(model.config, "is_encoder_decoder", False))))


def _hidden_size(model: nn.Module) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _refuse_second(model: nn.Module) -> None:
    if hasattr(model, ADAPTER_NAME):
        raise ValueError(f"{type(model).__name__} already has a prefix-tuning adapter (model.{ADAPTER_NAME}); "
                         "attach to a fresh model")


def _attach(model: nn.Module, spec: Union[Tuple[int, Optional[int]], PrefixCheckpoint]) -> nn.Module:
    """Attach fresh prefixes (``spec`` = (prefix_len, projection_dim)) or a checkpoint's."""
    _refuse_second(model)
    route = route_of(model)
    if route is not None and SHARED_PROMPT_USER in route.users:
        raise ValueError(f"{type(model).__name__} has a DePT adapter sharing its prompt's keys/values, which take "
                         "the same attention argument as prefixes; attach DePT with share_prompt=False to combine them")
    with prefix_route(model, PREFIX_TUNING_USER) as route:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        if isinstance(spec, PrefixCheckpoint):
            _check_layouts(spec, route.layouts)
            prefix_len, stacks = spec.config.prefix_len, {name: (s.projection_dim, s.embed_dim)
                                                           for name, s in spec.config.stacks.items()}
            dtype = next(iter(spec.tensors.values())).dtype
        else:
            prefix_len, projection_dim = spec
            stacks = {name: (projection_dim, _hidden_size(model)) for name in route.layouts}
        encoders = {name: FusedPrefixEncoder(prefix_len, *layout, projection_dim=stacks[name][0],
                                             embed_dim=stacks[name][1], dtype=dtype, device=device)
                    for name, layout in route.layouts.items()}
        adapter = PrefixTuning(encoders)
        if isinstance(spec, PrefixCheckpoint):
            adapter.encoders.load_state_dict(spec.tensors)
    hooks = [(stack, "pre", StackPrefixes(adapter, name, stack, route)) for name, stack in route.stacks.items()]
    return attach(model, ADAPTER_NAME, adapter, adapter_config(adapter).to_json(), hooks)


class StackPrefixes:
    """Forward pre-hook of one stack: guard the pass, evaluate the stack's prefixes, pass them as the
    kwarg (a callable object, so ``copy.deepcopy(model)`` maps it onto the copy's adapter)."""

    def __init__(self, adapter: PrefixTuning, name: str, stack: nn.Module, route: PrefixRoute) -> None:
        self.adapter, self.name, self.route = adapter, name, route
        self.signature = inspect.signature(stack.forward)
        self.shift_positions = "position_ids" in self.signature.parameters

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
        self.route.begin_pass(module)
        kwargs = forward_arguments(self.signature, args, kwargs)
        key_values = self.adapter.encoders[self.name].key_values()
        return (), prefix_pass(kwargs, key_values, shift_positions=self.shift_positions)


def _check_layouts(checkpoint: PrefixCheckpoint, model: Dict[str, Tuple[int, int, int]]) -> None:
    saved = {name: stack.layout for name, stack in checkpoint.config.stacks.items()}
    for name in set(saved) | set(model):
        if saved.get(name) != model.get(name):
            raise ValueError(
                f"{checkpoint.source} does not fit this model: {name} prefixes (layers, kv_heads, head_dim) = "
                f"{saved.get(name)} in the checkpoint, {model.get(name)} in the model")
