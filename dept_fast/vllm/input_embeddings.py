"""A saved transformers model's own input-embedding module, built without loading the model.

:func:`load_input_embeddings` constructs the model class from its ``config.json`` on the meta
device (no memory, no initialisation), takes ``get_input_embeddings()`` (the module whose forward
gives ``E[ids]`` as the model computes it, e.g. Gemma's scaled embedding), and materialises that
module alone: its saved tensors (the word-embedding matrix) are read from the model's weights
(``model.safetensors``, or only the shard that holds them per ``model.safetensors.index.json``;
``pytorch_model*.bin`` as well), its non-saved buffers (e.g. Gemma's ``embed_scale``) are
initialised by the model's own ``_init_weights``.
"""
import math
import os
from typing import Dict, List, NamedTuple, Optional, Union

import torch
from torch import nn

from ..checkpoint.whole_model import find_whole_model

PathLike = Union[str, os.PathLike]


class InputEmbeddings(NamedTuple):
    """``module``: the materialised input embeddings; ``model``: the model they belong to, on the meta
    device (its class and config; no memory)."""

    module: nn.Embedding
    model: nn.Module


def load_input_embeddings(path: PathLike, dtype: Optional[torch.dtype] = None,
                          device: Union[str, torch.device, None] = None) -> InputEmbeddings:
    """The input-embedding module of the decoder-only model saved in directory ``path``
    (``save_pretrained``), frozen, its weight in ``dtype`` (None: as saved) on ``device`` (None: CPU).

    Raises FileNotFoundError when ``path`` holds no saved model or its weights lack the embedding's
    tensors, ValueError for an encoder-decoder model (vLLM takes ``prompt_embeds`` for decoder-only
    models only), TypeError when the model's input embeddings are not an ``nn.Embedding``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    whole = find_whole_model(path) if os.path.isdir(path) else None
    if whole is None:
        raise FileNotFoundError(f"{path} is not a saved transformers model (a directory with config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.is_encoder_decoder:
        raise ValueError(f"{path} holds an encoder-decoder model ({config.model_type}); vLLM takes prompt_embeds "
                         "for decoder-only models only")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() is a {type(embeddings).__name__}, not an "
                        "nn.Embedding; DePT needs a plain embedding table")
    module_name = next(name for name, module in model.named_modules() if module is embeddings)
    saved = _saved_tensors(whole, model, module_name, list(embeddings.state_dict()))
    if dtype is not None:
        saved = {name: t.to(dtype) if t.is_floating_point() else t for name, t in saved.items()}
    device = torch.device("cpu" if device is None else device)
    _init_unsaved_buffers(model, embeddings, set(saved), device)
    embeddings.load_state_dict({name: t.to(device) for name, t in saved.items()}, assign=True)
    left = [name for name, t in embeddings.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ValueError(f"{path}: could not materialise {left} of {type(embeddings).__name__}")
    expected = (embeddings.num_embeddings, embeddings.embedding_dim)
    if tuple(embeddings.weight.shape) != expected:
        raise ValueError(f"{path}: the saved word embeddings have shape {tuple(embeddings.weight.shape)}, the "
                         f"config says (vocab_size, hidden) = {expected}")
    return InputEmbeddings(embeddings.requires_grad_(False).eval(), model)


def _saved_tensors(whole, model: nn.Module, module_name: str, names: List[str]) -> Dict[str, torch.Tensor]:
    """The module's saved tensors ``names`` from the model's weights, looked for under the module's
    path in the model (``model.embed_tokens.``) and without the base model's prefix (a save of the
    bare base model: ``embed_tokens.``)."""
    prefixes = [module_name + "."]
    base = getattr(model, "base_model_prefix", "")
    if base and module_name.startswith(base + "."):
        prefixes.append(module_name[len(base) + 1:] + ".")
    for prefix in prefixes:
        tensors = whole.tensors(prefix)
        if all(name in tensors.header for name in names):
            return tensors.load(names)
    raise FileNotFoundError(f"{whole.path}: the model's weights hold no {names} under {prefixes} (the input "
                            f"embeddings of {type(model).__name__}, model.get_input_embeddings() at {module_name!r})")


@torch.no_grad()
def _init_unsaved_buffers(model: nn.Module, embeddings: nn.Module, saved: set, device: torch.device) -> None:
    """Give ``embeddings``' buffers that no file holds (non-persistent ones, e.g. Gemma's embed_scale)
    their values through the model's own ``_init_weights``; the saved tensors stay on the meta
    device meanwhile (their initialisation is a no-op there; the file's values replace them)."""
    unsaved = []
    for module_path, module in embeddings.named_modules():
        for name, buffer in module._buffers.items():
            full = f"{module_path}.{name}" if module_path else name
            if buffer is not None and full not in saved:
                if not buffer.is_floating_point():
                    raise ValueError(f"{type(embeddings).__name__} has an integer buffer {full!r} that the saved "
                                     "weights do not hold; its value cannot be rebuilt without the model")
                module._buffers[name] = torch.full_like(buffer, math.nan, device=device)  # NaN: unset, caught below
                unsaved.append((full, module, name))
    if not unsaved:
        return
    for module in embeddings.modules():
        model._init_weights(module)
    for full, module, name in unsaved:
        if module._buffers[name].isnan().any():
            raise ValueError(f"{type(model).__name__}._init_weights does not set the embedding's buffer {full!r}, "
                             "which the saved weights do not hold either")
