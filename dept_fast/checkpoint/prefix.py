"""Saving and loading Prefix-Tuning adapters: our format, PEFT ``PREFIX_TUNING``, and the adapter
inside a whole-model save.

Ours (``PrefixTuning.save_pretrained``) is a directory with ``dept_prefix_config.json``
(:class:`~dept_fast.checkpoint.config.PrefixTuningConfig` as json) and ``dept_prefix.safetensors``
(the encoders' parameters, ``<stack>.<parameter>``, in their own dtype, MLP included unless merged;
the config again in its header, the copy readers trust). PEFT ``PREFIX_TUNING`` checkpoints
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``, read with ``weights_only=True``)
hold ``prompt_embeddings`` (p, layers * 2 * kv_heads * head_dim): the prefixes themselves (PEFT
evaluates its MLP before saving), loaded as a merged encoder. PEFT's encoder-decoder prefixes sit on
the decoder's self- and cross-attention, not on the encoder, so those checkpoints are refused for
T5. A whole-model save holds ``prefix_adapters.<name>.encoders.<stack>.<parameter>`` and the
config under ``"dept_fast" -> "prefix_tuning" -> name`` in ``config.json``.
"""
import os
from dataclasses import asdict, dataclass
from typing import Dict, Tuple, Union

import torch

from ..modules.prefix_encoder import FusedPrefixEncoder
from ..modules.prefix_tuning import PrefixTuning
from .config import PrefixTuningConfig, StackConfig, field
from .files import (PEFT_CONFIG_NAME, check_header, load_tensors, read_adapter_weights, read_json, read_saved,
                    save_checkpoint)
from .whole_model import MODEL_CONFIG_KEY, find_whole_model

CONFIG_NAME = "dept_prefix_config.json"
WEIGHTS_NAME = "dept_prefix.safetensors"
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
        for name, encoder in adapter.encoders.items()})


def save_prefix(adapter: PrefixTuning, path: PathLike) -> None:
    """Write the adapter's config and tensors into directory ``path`` (crash-safe, see files.py)."""
    save_checkpoint(path, dict(adapter.encoders.state_dict()), adapter_config(adapter).to_json(), WEIGHTS_NAME,
                    CONFIG_NAME)


def expected_tensors(config: PrefixTuningConfig) -> Dict[str, Tuple[int, ...]]:
    """``<stack>.<parameter>`` -> shape of the encoders ``config`` describes."""
    return {f"{name}.{key}": shape for name, stack in config.stacks.items()
            for key, shape in FusedPrefixEncoder.parameter_shapes(config.prefix_len, **asdict(stack)).items()}


def read_prefix_checkpoint(path: PathLike, is_encoder_decoder: bool, adapter_name: str = "default") -> PrefixCheckpoint:
    """Read our format, PEFT PREFIX_TUNING (refused for encoder-decoders) or a whole-model save (its
    adapter ``adapter_name``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a prefix-tuning checkpoint is a directory)")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return _read_ours(path)
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
        return _read_peft(path, is_encoder_decoder)
    whole = find_whole_model(path)
    if whole is not None:
        source = f"{whole.config_file} ({MODEL_CONFIG_KEY}.prefix_tuning.{adapter_name})"
        config = PrefixTuningConfig.from_json(whole.adapter_config("prefix_tuning", adapter_name), source)
        shapes = expected_tensors(config)
        tensors = whole.load({name: f"prefix_adapters.{adapter_name}.encoders.{name}" for name in shapes}, shapes)
        return PrefixCheckpoint(config, tensors, f"saved model {path}")
    raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (dept_fast) nor {PEFT_CONFIG_NAME} (PEFT) "
                            "nor a saved model with a Prefix-Tuning adapter")


def _read_ours(path: str) -> PrefixCheckpoint:
    config, weights, header = read_saved(path, CONFIG_NAME, WEIGHTS_NAME, PrefixTuningConfig.from_json)
    shapes = expected_tensors(config)
    found = {name: shape for name, (_, shape) in header.items()}
    if found != shapes:
        raise ValueError(f"{weights}: tensors {found} do not match the prefixes of its config {shapes}")
    check_header(weights, header, shapes)
    return PrefixCheckpoint(config, load_tensors(weights, shapes), f"dept_fast checkpoint {path}")


def _read_peft(path: str, is_encoder_decoder: bool) -> PrefixCheckpoint:
    """PEFT PREFIX_TUNING: ``prompt_embeddings`` (p, layers * 2 * kv_heads * head_dim) -> our layout."""
    config_file = os.path.join(path, PEFT_CONFIG_NAME)
    data = read_json(config_file)
    if data.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{config_file} has peft_type {data.get('peft_type')!r}; "
                         "load_prefix_tuning reads PREFIX_TUNING")
    if is_encoder_decoder or (data.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{path} is a PEFT encoder-decoder prefix (decoder self- and cross-attention); dept_fast "
                         "follows Li & Liang (encoder and decoder self-attention), so it cannot load it")
    prefix_len, layers, kv_heads, token_dim = (field(data, key, config_file, "int", 1) for key in (
        "num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"))
    if token_dim % kv_heads:
        raise ValueError(f"{config_file}: token_dim {token_dim} is not a multiple of num_attention_heads {kv_heads}")
    head_dim = token_dim // kv_heads
    file, header, loaded = read_adapter_weights(path)
    if set(header) != {"prompt_embeddings"}:
        raise ValueError(f"{path}: expected exactly the tensor 'prompt_embeddings', found {sorted(header)}")
    expected = (prefix_len, layers * 2 * kv_heads * head_dim)
    if header["prompt_embeddings"][1] != expected:
        raise ValueError(f"{path}: prompt_embeddings has shape {header['prompt_embeddings'][1]}, the adapter config "
                         f"implies {expected} (num_virtual_tokens, num_layers * 2 * token_dim)")
    check_header(file, header, {"prompt_embeddings": expected})
    prompt = (loaded if loaded is not None else load_tensors(file, ["prompt_embeddings"]))["prompt_embeddings"]
    prefix = prompt.view(prefix_len, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
    config = PrefixTuningConfig(prefix_len, {"decoder": StackConfig(layers, kv_heads, head_dim)})
    return PrefixCheckpoint(config, {"decoder.prefix": prefix}, f"PEFT PREFIX_TUNING checkpoint {path}")
