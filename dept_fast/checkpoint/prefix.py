"""Saving and loading Prefix-Tuning adapters: our format, PEFT ``PREFIX_TUNING``, and the adapter
inside a whole-model save.

Ours (``PrefixTuning.save_pretrained``) is a directory with ``dept_prefix_config.json``
(:class:`~dept_fast.checkpoint.config.PrefixTuningConfig` as json) and ``dept_prefix.safetensors``
(the encoders' parameters, ``<stack>.<parameter>``, in their own dtype, MLP included unless merged;
the config again in its header, the copy readers trust). PEFT ``PREFIX_TUNING`` checkpoints
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``, read with ``weights_only=True``)
hold ``prompt_embeddings`` (p, layers * 2 * kv_heads * head_dim): the prefixes themselves (PEFT
evaluates its MLP before saving), loaded as a merged encoder; an encoder-decoder's (T5, BART) as a
"decoder" prefix with the "cache" position convention, the one attention PEFT gives it (see
:func:`_read_peft`). A whole-model save (:mod:`~dept_fast.checkpoint.whole_model`) holds
``prefix_adapters.<name>.encoders.<stack>.<parameter>`` and the config recorded under
``"dept_fast" -> "prefix_tuning" -> name`` in ``config.json`` when the adapter was attached; each stack's form (MLP or merged prefixes) is read
from the tensors, so a save after ``merge()`` loads too.
"""
import os
from dataclasses import asdict, dataclass, replace
from typing import Dict, Tuple, Union

import torch

from ..distributed import refuse_shards
from ..modules.prefix_encoder import FusedPrefixEncoder
from ..modules.prefix_tuning import PrefixTuning
from .config import PrefixTuningConfig, StackConfig, field
from .files import (PEFT_CONFIG_NAME, Header, Tensors, check_header, is_saved, read_adapter_weights, read_json,
                    read_saved, save_checkpoint)
from .whole_model import find_whole_model

CONFIG_NAME = "dept_prefix_config.json"
WEIGHTS_NAME = "dept_prefix.safetensors"
KIND = "prefix_tuning"
"""Prefix-Tuning adapters' key among a model's recorded configs; their tensors sit under
``prefix_adapters.<name>.encoders.``."""
STACK_KEYS = ("num_layers", "num_kv_heads", "head_dim", "projection_dim", "embed_dim")

PathLike = Union[str, os.PathLike]


@dataclass
class PrefixCheckpoint:
    """A Prefix-Tuning adapter as read: its config and the encoders' tensors (``<stack>.<parameter>``)."""

    config: PrefixTuningConfig
    tensors: Dict[str, torch.Tensor]
    source: str


def adapter_config(adapter: PrefixTuning) -> PrefixTuningConfig:
    return PrefixTuningConfig(adapter.prefix_len, {
        name: StackConfig(**{key: getattr(encoder, key) for key in STACK_KEYS})
        for name, encoder in adapter.encoders.items()}, adapter.positions)


def save_prefix(adapter: PrefixTuning, path: PathLike) -> None:
    """Write the adapter's config and tensors into directory ``path`` (crash-safe, see files.py)."""
    # The parameters as registered (not state_dict(), which FSDP2 gives as shards even inside unshard()).
    tensors, config = dict(adapter.encoders.named_parameters()), adapter_config(adapter)
    refuse_shards(tensors, expected_tensors(config), "a Prefix-Tuning adapter's save")
    save_checkpoint(path, tensors, config.to_json(), WEIGHTS_NAME, CONFIG_NAME)


def expected_tensors(config: PrefixTuningConfig) -> Dict[str, Tuple[int, ...]]:
    """``<stack>.<parameter>`` -> shape of the encoders ``config`` describes."""
    return {f"{name}.{key}": shape for name, stack in config.stacks.items()
            for key, shape in FusedPrefixEncoder.parameter_shapes(config.prefix_len, **asdict(stack)).items()}


def read_prefix_checkpoint(path: PathLike, is_encoder_decoder: bool, adapter_name: str = "default") -> PrefixCheckpoint:
    """Read our format, PEFT PREFIX_TUNING or a whole-model save (its adapter ``adapter_name``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a prefix-tuning checkpoint is a directory)")
    if is_saved(path, CONFIG_NAME, WEIGHTS_NAME):
        config, tensors = read_saved(path, CONFIG_NAME, WEIGHTS_NAME, PrefixTuningConfig.from_json)
        return _adapter_tensors(config, tensors, f"dept_fast checkpoint {path}")
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
        return _read_peft(path, is_encoder_decoder)
    whole = find_whole_model(path)
    if whole is not None:
        data, source = whole.adapter_config(KIND, adapter_name)
        tensors = whole.tensors(f"prefix_adapters.{adapter_name}.encoders.")
        config = _encoder_forms(PrefixTuningConfig.from_json(data, source), tensors.header)
        return _adapter_tensors(config, tensors, f"saved model {path}")
    raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (dept_fast) nor {PEFT_CONFIG_NAME} (PEFT) "
                            "nor a saved model with a Prefix-Tuning adapter")


def _adapter_tensors(config: PrefixTuningConfig, tensors: Tensors, source: str) -> PrefixCheckpoint:
    """The encoders' tensors (``<stack>.<parameter>``), checked against ``config`` and then loaded."""
    shapes = expected_tensors(config)
    found = {name: shape for name, (_, shape) in tensors.header.items()}
    if found != shapes:
        raise ValueError(f"{tensors.source}: tensors {found} do not match the prefixes of its config {shapes}")
    check_header(tensors.source, tensors.header, shapes)
    return PrefixCheckpoint(config, tensors.load(shapes), source)


def _encoder_forms(config: PrefixTuningConfig, header: Header) -> PrefixTuningConfig:
    """``config`` with each stack's encoder form (MLP or prefixes) read from the tensors' names and
    shapes: a model's recorded config is written when the adapter is attached, before any
    :meth:`~dept_fast.modules.PrefixTuning.merge`."""
    stacks = {}
    for name, stack in config.stacks.items():
        if f"{name}.prefix" in header:
            stack = replace(stack, projection_dim=None)
        elif len(header.get(f"{name}.proj_in.weight", ("", ()))[1]) == 2:
            projection_dim, embed_dim = header[f"{name}.proj_in.weight"][1]
            stack = replace(stack, projection_dim=projection_dim, embed_dim=embed_dim)
        stacks[name] = stack  # otherwise as recorded: the shape check names what is missing
    return replace(config, stacks=stacks)


def _read_peft(path: str, is_encoder_decoder: bool) -> PrefixCheckpoint:
    """PEFT PREFIX_TUNING: ``prompt_embeddings`` (p, layers * 2 * kv_heads * head_dim) -> our layout.

    A causal decoder's layer i takes rows (2i, 2i + 1) of the view (p, 2 * layers, kv_heads,
    head_dim). An encoder-decoder's checkpoint (``num_transformer_submodules`` 2) is what PEFT's
    ``get_prompt`` makes of it: the view doubled along its layer rows ([rows ; rows], 4 * layers) and
    cut into per-layer groups of 4 (self key, self value, cross key, cross value); the cross-attention
    part is then replaced by an empty cache, so only the decoder's self-attention gets a prefix, and
    decoder layer i's is saved layer (2i mod layers)'s. Loaded as a "decoder" prefix with the "cache"
    position convention (the prefix at positions 0..p-1, the decoder's tokens after it)."""
    config_file = os.path.join(path, PEFT_CONFIG_NAME)
    data = read_json(config_file)
    if data.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{config_file} has peft_type {data.get('peft_type')!r}; "
                         "load_prefix_tuning reads PREFIX_TUNING")
    prefix_len, layers, kv_heads, token_dim = (field(data, key, config_file, "int", 1) for key in (
        "num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"))
    submodules = field(data, "num_transformer_submodules", config_file, "int", 1, default=None) or 1
    if submodules not in (1, 2) or (submodules == 2) != is_encoder_decoder:
        model = "an encoder-decoder" if is_encoder_decoder else "a causal decoder"
        raise ValueError(f"{config_file}: num_transformer_submodules {submodules} (task_type "
                         f"{data.get('task_type')!r}) is not what PEFT gives {model} (2 for encoder-decoders, "
                         "1 for causal decoders), so its prefixes do not describe this model's attention")
    if token_dim % kv_heads:
        raise ValueError(f"{config_file}: token_dim {token_dim} is not a multiple of num_attention_heads {kv_heads}")
    head_dim = token_dim // kv_heads
    tensors = read_adapter_weights(path)
    expected = (prefix_len, layers * 2 * kv_heads * head_dim)
    found = tensors.header.get("prompt_embeddings", ("", expected))[1]
    if found != expected:
        raise ValueError(f"{path}: prompt_embeddings has shape {found}, the adapter config implies {expected} "
                         "(num_virtual_tokens, num_layers * 2 * token_dim)")
    check_header(tensors.source, tensors.header, {"prompt_embeddings": expected})
    prompt = tensors.load(["prompt_embeddings"])["prompt_embeddings"]
    prefix = prompt.view(prefix_len, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    positions = None
    if submodules == 2:
        prefix, positions = prefix[[2 * layer % layers for layer in range(layers)]], "cache"
    config = PrefixTuningConfig(prefix_len, {"decoder": StackConfig(layers, kv_heads, head_dim)}, positions)
    return PrefixCheckpoint(config, {"decoder.prefix": prefix.contiguous()}, f"PEFT PREFIX_TUNING checkpoint {path}")
