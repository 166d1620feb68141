"""Prefix-Tuning on a transformers model: ``apply_prefix_tuning``, ``load_prefix_tuning``.

The adapter, :class:`PrefixTuning`, is registered on the model as ``model.prefix_tuning``: one
:class:`FusedPrefixEncoder` per attention stack (``"decoder"`` for GPT-2, Llama and other causal
decoders; ``"encoder"`` and ``"decoder"`` for T5, the paper's encoder and decoder prefixes, on the
encoder's and the decoder's self-attention; Li & Liang's code's third prefix, on the decoder's
cross-attention, is not implemented). The base model is frozen and keeps its class, forward
signature and ``generate()``. A forward pre-hook on each stack evaluates its encoder and passes the
per-layer prefixes to the prefix attention function (``dept_fast.prefix_attention``) as the
``dept_prefix`` kwarg, with ``position_ids`` starting at p (``prefix_position_ids``).

Checkpoints. Ours (``PrefixTuning.save_pretrained``) is a directory with ``dept_prefix_config.json``
(``{"format": "dept_fast.prefix_tuning", "format_version": 1, "prefix_len": p, "stacks": {stack:
{"num_layers", "num_kv_heads", "head_dim", "projection_dim", "embed_dim"}}}``) and
``dept_prefix.safetensors`` (the encoders' parameters, ``<stack>.<parameter>``, in their own dtype,
MLP included unless merged). PEFT ``PREFIX_TUNING`` checkpoints (``adapter_config.json`` +
``adapter_model.safetensors`` or ``.bin``, read with ``weights_only=True``) hold ``prompt_embeddings``
(p, layers * 2 * kv_heads * head_dim): the prefixes themselves (PEFT evaluates its MLP before
saving), loaded as a merged encoder. PEFT's encoder-decoder prefixes sit on the decoder's self- and
cross-attention, not on the encoder, so those checkpoints are refused for T5.
"""
import inspect
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import PEFT_CONFIG_NAME, _read_json, _read_peft_weights
from .hf_dept import ADAPTER_NAME as DEPT_ADAPTER_NAME
from .prefix_attention import (begin_pass, checkpointed_modules, forward_arguments, prefix_attention_setup,
                               prefix_forward_kwargs)
from .prefix_encoder import FusedPrefixEncoder

ADAPTER_NAME = "prefix_tuning"
CONFIG_NAME = "dept_prefix_config.json"
WEIGHTS_NAME = "dept_prefix.safetensors"
FORMAT = "dept_fast.prefix_tuning"
FORMAT_VERSION = 1

STACK_KEYS = ("num_layers", "num_kv_heads", "head_dim", "projection_dim", "embed_dim")

PathLike = Union[str, os.PathLike]


class _Checkpoint(NamedTuple):
    """A checkpoint as read: per stack the :data:`STACK_KEYS` of its encoder, and the encoders' tensors."""

    prefix_len: int
    stacks: Dict[str, Dict[str, Optional[int]]]
    tensors: Dict[str, torch.Tensor]
    source: str


class PrefixTuning(nn.Module):
    """The prefixes attached to a model as ``model.prefix_tuning``: ``encoders[stack]`` per attention stack.

    Use :meth:`merge` after training (evaluates each MLP once, keeps the prefixes) and
    :meth:`save_pretrained` to write a checkpoint that :func:`load_prefix_tuning` reads.
    """

    def __init__(self, encoders: Dict[str, FusedPrefixEncoder], inner: str) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.inner = inner

    def merge(self) -> "PrefixTuning":
        """Merge every encoder (see :meth:`FusedPrefixEncoder.merge`)."""
        for encoder in self.encoders.values():
            encoder.merge()
        return self

    def save_pretrained(self, path: PathLike) -> None:
        """Write ``dept_prefix_config.json`` and ``dept_prefix.safetensors`` into directory ``path``."""
        os.makedirs(path, exist_ok=True)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "prefix_len": next(iter(self.encoders.values())).prefix_len,
                  "stacks": {name: {key: getattr(encoder, key) for key in STACK_KEYS}
                             for name, encoder in self.encoders.items()}}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.encoders.state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


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
    (:meth:`PrefixTuning.save_pretrained`) or a PEFT ``PREFIX_TUNING`` checkpoint. Raises ValueError
    when the checkpoint's layers, heads or head width do not match the model's."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a prefix-tuning checkpoint is a directory)")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return _attach(model, _read_ours(path))
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
        return _attach(model, _read_peft(model, path))
    raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (dept_fast) nor {PEFT_CONFIG_NAME} (PEFT)")


def _hidden_size(model: nn.Module) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _attach(model: nn.Module, spec: Union[Tuple[int, Optional[int]], _Checkpoint]) -> nn.Module:
    """Attach fresh prefixes (``spec`` = (prefix_len, projection_dim)) or a checkpoint's."""
    if hasattr(model, ADAPTER_NAME):
        raise ValueError(f"{type(model).__name__} already has a prefix-tuning adapter (model.{ADAPTER_NAME}); "
                         "attach to a fresh model")
    if getattr(getattr(model, DEPT_ADAPTER_NAME, None), "share_prompt", False):
        raise ValueError(f"{type(model).__name__} has a DePT adapter sharing its prompt's keys/values, which take "
                         "the same attention argument as prefixes; attach DePT with share_prompt=False to combine them")
    with prefix_attention_setup(model) as setup:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        if isinstance(spec, _Checkpoint):
            _check_layouts(spec, setup.layouts)
            prefix_len, stacks = spec.prefix_len, spec.stacks
            dtype = next(iter(spec.tensors.values())).dtype
        else:
            prefix_len, projection_dim = spec
            stacks = {name: {"projection_dim": projection_dim, "embed_dim": _hidden_size(model)}
                      for name in setup.layouts}
        encoders = {name: FusedPrefixEncoder(prefix_len, *layout, projection_dim=stacks[name]["projection_dim"],
                                             embed_dim=stacks[name]["embed_dim"], dtype=dtype, device=device)
                    for name, layout in setup.layouts.items()}
        adapter = PrefixTuning(encoders, setup.inner)
        if isinstance(spec, _Checkpoint):
            _load_tensors(adapter, spec)
    model.requires_grad_(False)
    model.add_module(ADAPTER_NAME, adapter)
    checkpointed = checkpointed_modules(model)
    for name, stack in setup.stacks.items():
        stack.register_forward_pre_hook(_stack_hook(adapter, name, stack, checkpointed), with_kwargs=True)
    return model


def _stack_hook(adapter: PrefixTuning, name: str, stack: nn.Module, checkpointed: List[nn.Module]):
    """Before ``stack`` runs: guard checkpointing, evaluate its prefixes, pass them as the kwarg."""
    signature = inspect.signature(stack.forward)
    shift_positions = "position_ids" in signature.parameters

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        begin_pass(module, adapter.inner, checkpointed)
        kwargs = forward_arguments(signature, args, kwargs)
        key_values = adapter.encoders[name].key_values()
        return (), prefix_forward_kwargs(kwargs, key_values, inner=adapter.inner, shift_positions=shift_positions)

    return hook


def _check_layouts(checkpoint: _Checkpoint, model: Dict[str, Tuple[int, int, int]]) -> None:
    for name in set(checkpoint.stacks) | set(model):
        saved = checkpoint.stacks.get(name)
        saved = saved and tuple(saved[key] for key in STACK_KEYS[:3])
        if saved != model.get(name):
            raise ValueError(
                f"{checkpoint.source} does not fit this model: {name} prefixes (layers, kv_heads, head_dim) = "
                f"{saved} in the checkpoint, {model.get(name)} in the model")


def _load_tensors(adapter: PrefixTuning, checkpoint: _Checkpoint) -> None:
    expected = {name: tuple(t.shape) for name, t in adapter.encoders.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in checkpoint.tensors.items()}
    if expected != found:
        raise ValueError(f"{checkpoint.source}: tensors {found} do not match the model's prefixes {expected}")
    adapter.encoders.load_state_dict(checkpoint.tensors)


def _read_ours(path: PathLike) -> _Checkpoint:
    config = _read_json(os.path.join(path, CONFIG_NAME))
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{CONFIG_NAME} in {path} is not a {FORMAT} v{FORMAT_VERSION} config: "
                         f"format={config.get('format')!r}, format_version={config.get('format_version')!r}")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    return _Checkpoint(config["prefix_len"], config["stacks"], tensors, f"dept_fast checkpoint {path}")


def _read_peft(model: nn.Module, path: PathLike) -> _Checkpoint:
    """PEFT PREFIX_TUNING: ``prompt_embeddings`` (p, layers * 2 * kv_heads * head_dim) -> our layout."""
    config = _read_json(os.path.join(path, PEFT_CONFIG_NAME))
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{PEFT_CONFIG_NAME} in {path} has peft_type {config.get('peft_type')!r}; "
                         "load_prefix_tuning reads PREFIX_TUNING")
    if getattr(model.config, "is_encoder_decoder", False) or (config.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{path} is a PEFT encoder-decoder prefix (decoder self- and cross-attention); dept_fast "
                         "follows Li & Liang (encoder and decoder self-attention), so it cannot load it")
    tensors = _read_peft_weights(path)
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{path}: expected exactly the tensor 'prompt_embeddings', found {sorted(tensors)}")
    prompt = tensors["prompt_embeddings"]
    prefix_len, layers, kv_heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    head_dim = config["token_dim"] // kv_heads
    expected = (prefix_len, layers * 2 * kv_heads * head_dim)
    if tuple(prompt.shape) != expected:
        raise ValueError(f"{path}: prompt_embeddings has shape {tuple(prompt.shape)}, the adapter config implies "
                         f"{expected} (num_virtual_tokens, num_layers * 2 * token_dim)")
    prefix = prompt.view(prefix_len, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
    stack = dict(zip(STACK_KEYS, (layers, kv_heads, head_dim, None, None)))
    return _Checkpoint(prefix_len, {"decoder": stack}, {"decoder.prefix": prefix},
                       f"PEFT PREFIX_TUNING checkpoint {path}")
