"""Saving and loading DePT adapters: our format, the DePT authors', PEFT prompt tuning, and the
adapter inside a whole-model save (``model.save_pretrained``, ``Trainer.save_model``, Trainer checkpoints).

Our format (``FusedDePTEmbedding.save_pretrained``), a directory with
    dept_config.json        :class:`~dept_fast.checkpoint.config.DePTConfig` as json
    dept_model.safetensors  prompt (m, d), lora_A (s, r), lora_B (r, d), in their training dtype;
                            the config again in the header (the copy readers trust, see files.py)

Read as well (a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` or
``adapter_model.bin``; ``.bin`` files go through ``torch.load(weights_only=True, mmap=True)``):
* the DePT authors' ``PROMPT_TUNING_LORA`` (github.com/ZhengxiangShi/DePT): tensors
  ``prompt_embeddings`` (num_virtual_tokens x num_transformer_submodules rows, the first
  num_virtual_tokens used), ``prompt_encoder.lora_embedding_A`` (max_length, r) and
  ``prompt_encoder.lora_embedding_B`` (r, d); config ``num_virtual_tokens``, ``r``, ``lora_alpha``,
  ``max_length``. As in their loader, A and B are read only when ``load_lora_embeddings`` (and B only
  when ``load_lora_embedding_B``) is true; a B that is not read stays at its zero initialisation,
  so the update is zero, which is what their code computes;
* PEFT ``PROMPT_TUNING``: ``prompt_embeddings`` only (rank 0); PEFT records no max_length;
* a whole-model save of a model with DePT adapters (:mod:`~dept_fast.checkpoint.whole_model`):
  each adapter's config recorded in ``config.json`` under ``"dept_fast" -> "dept" -> name`` (by
  ``apply_dept``/``load_dept``), its tensors ``dept_adapters.<name>.prompt``, ``.lora_A``,
  ``.lora_B`` in the model's weights.

Every reader checks names, dtypes and shapes (against the config and the model's width) in the
files' headers before a tensor is loaded or an adapter allocated. The one allocation a file does not
back is the DePT authors' A/B left unread (a fresh (max_length, r) update, as their loader makes);
``load_dept`` checks max_length against the model's position limit first, where it has one.
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..distributed import refuse_shards
from ..modules.dept_embedding import FusedDePTEmbedding
from .config import DePTConfig, field
from .files import (PEFT_CONFIG_NAME, Tensors, check_header, is_saved, read_adapter_weights, read_json,
                    read_saved, save_checkpoint)
from .whole_model import WholeModel, find_whole_model

CONFIG_NAME = "dept_config.json"
WEIGHTS_NAME = "dept_model.safetensors"
AUTHORS_A, AUTHORS_B = "prompt_encoder.lora_embedding_A", "prompt_encoder.lora_embedding_B"
# Defaults of the DePT authors' PromptTuningLoRAConfig, for fields their json may leave out.
AUTHORS_DEFAULTS = {"r": 8, "lora_alpha": 8, "max_length": 256, "load_lora_embeddings": True,
                    "load_lora_embedding_B": True}
KIND = "dept"
"""DePT adapters' key among a model's recorded configs; their tensors sit under ``dept_adapters.<name>.``."""
TENSOR_NAMES = ("prompt", "lora_A", "lora_B")

PathLike = Union[str, os.PathLike]


@dataclass
class DePTCheckpoint:
    """An adapter as read from disk. ``tensors`` maps prompt / lora_A / lora_B to a tensor, or to
    None for one the format leaves at its fresh initialisation (the DePT authors' optional A/B)."""

    config: DePTConfig
    tensors: Dict[str, Optional[torch.Tensor]]
    source: str


def save_embedding(adapter: FusedDePTEmbedding, path: PathLike) -> None:
    """Write ``adapter``'s prompt, lora_A, lora_B and config into directory ``path`` (created if
    needed), crash-safe: an interrupted save leaves the previous checkpoint or this one."""
    tensors, config = {name: getattr(adapter, name) for name in TENSOR_NAMES}, adapter_config(adapter)
    refuse_shards(tensors, _expected_shapes(config, adapter.embedding_dim), "a DePT adapter's save")
    save_checkpoint(path, tensors, config.to_json(), WEIGHTS_NAME, CONFIG_NAME)


def adapter_config(adapter: FusedDePTEmbedding) -> DePTConfig:
    return DePTConfig(adapter.num_prompt_tokens, adapter.rank, adapter.max_length, adapter.lora_alpha,
                      adapter.embedding_dim)


def load_embedding(path: PathLike, word_embeddings: nn.Embedding, max_length: Optional[int] = None, *,
                   embed_scale: Optional[float] = None) -> FusedDePTEmbedding:
    """Read the adapter in directory ``path`` (any supported format) around ``word_embeddings``, whose
    module multiplies its rows by ``embed_scale`` (not in checkpoints: a property of the base model)."""
    return build_embedding(read_checkpoint(path, word_embeddings.embedding_dim, max_length), word_embeddings,
                           embed_scale=embed_scale)


def read_checkpoint(path: PathLike, dim: int, max_length: Optional[int] = None,
                    adapter_name: str = "default") -> DePTCheckpoint:
    """Read an adapter directory for a model of width ``dim``: ours, the DePT authors', PEFT prompt
    tuning, or a whole-model save. ``max_length`` fills in a checkpoint that records none (PEFT) and
    must agree with one that does."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a DePT checkpoint is a directory)")
    if is_saved(path, CONFIG_NAME, WEIGHTS_NAME):
        return _read_ours(path, dim, max_length)
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
        return _read_peft(path, dim, max_length)
    whole = find_whole_model(path)
    if whole is not None:
        return _read_whole_model(whole, dim, max_length, adapter_name)
    raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (dept_fast) nor {PEFT_CONFIG_NAME} "
                            "(DePT authors' / PEFT) nor a saved model with a DePT adapter")


def build_embedding(checkpoint: DePTCheckpoint, word_embeddings: nn.Embedding, *,
                    embed_scale: Optional[float] = None) -> FusedDePTEmbedding:
    """A FusedDePTEmbedding around ``word_embeddings`` holding the checkpoint's tensors (saved dtype kept);
    ``embed_scale`` as in :class:`FusedDePTEmbedding` (given by the caller: checkpoints do not record it)."""
    c = checkpoint.config
    if c.max_length is None:
        raise ValueError(f"this {checkpoint.source} checkpoint records no max_length; pass max_length "
                         "(the longest input the adapter accepts)")
    adapter = FusedDePTEmbedding(word_embeddings, c.num_prompt_tokens, c.rank, c.max_length, c.lora_alpha,
                                 embed_scale=embed_scale)
    device = word_embeddings.weight.device
    for name, tensor in checkpoint.tensors.items():
        if tensor is not None:
            # A copy of its own: tensors read from one file may share a buffer (zero-size ones alias their
            # neighbours' address, which the Triton interpreter mistakes for the same storage).
            value = tensor.to(device=device, copy=True)
            setattr(adapter, name, nn.Parameter(value) if name in adapter._parameters else value)  # rank 0: buffers
    return adapter


def _resolve_max_length(recorded: Optional[int], given: Optional[int]) -> Optional[int]:
    if recorded is not None and given is not None and given != recorded:
        raise ValueError(f"the checkpoint's max_length is {recorded}; got max_length={given}")
    return recorded if recorded is not None else given


def _expected_shapes(config: DePTConfig, dim: int) -> Dict[str, Tuple[int, ...]]:
    return {"prompt": (config.num_prompt_tokens, dim), "lora_A": (config.max_length, config.rank),
            "lora_B": (config.rank, dim)}


def _check_shapes(found: Dict[str, Tuple[int, ...]], config: DePTConfig, dim: int, source: str) -> None:
    """Each present tensor has the shape ``config`` and the model's width ``dim`` imply."""
    if config.hidden_size is not None and config.hidden_size != dim:
        raise ValueError(f"{source}: the adapter was built for width d={config.hidden_size}, the model's "
                         f"word embeddings have d={dim}")
    for name, expected in _expected_shapes(config, dim).items():
        if name in found and tuple(found[name]) != expected:
            raise ValueError(f"{source}: {name} has shape {tuple(found[name])}, expected {expected} "
                             f"(m={config.num_prompt_tokens}, r={config.rank}, s={config.max_length}, d={dim} "
                             "from the model's embeddings)")


def _adapter_tensors(config: DePTConfig, tensors: Tensors, dim: int, max_length: Optional[int],
                     source: str) -> DePTCheckpoint:
    """Our tensor names (prompt, lora_A, lora_B): checked against ``config`` and ``dim``, then loaded."""
    _resolve_max_length(config.max_length, max_length)
    _check_shapes({name: tensors.header[name][1] for name in TENSOR_NAMES if name in tensors.header}, config, dim,
                  tensors.source)
    check_header(tensors.source, tensors.header, _expected_shapes(config, dim))
    return DePTCheckpoint(config, tensors.load(TENSOR_NAMES), source)


def _read_ours(path: str, dim: int, max_length: Optional[int]) -> DePTCheckpoint:
    config, tensors = read_saved(path, CONFIG_NAME, WEIGHTS_NAME, DePTConfig.from_json)
    return _adapter_tensors(config, tensors, dim, max_length, f"dept_fast checkpoint {path}")


def _read_whole_model(whole: WholeModel, dim: int, max_length: Optional[int], name: str) -> DePTCheckpoint:
    data, source = whole.adapter_config(KIND, name)
    return _adapter_tensors(DePTConfig.from_json(data, source), whole.tensors(f"dept_adapters.{name}."), dim,
                            max_length, f"saved model {whole.path}")


def _read_peft(path: str, dim: int, max_length: Optional[int]) -> DePTCheckpoint:
    config_file = os.path.join(path, PEFT_CONFIG_NAME)
    data = read_json(config_file)
    peft_type = data.get("peft_type")
    if peft_type not in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        raise ValueError(f"{config_file} has peft_type {peft_type!r}; load_dept reads "
                         "PROMPT_TUNING_LORA (DePT authors) and PROMPT_TUNING (PEFT)")
    m = field(data, "num_virtual_tokens", config_file, "int", 0)
    rows = m * (field(data, "num_transformer_submodules", config_file, "int", 1, default=None) or 1)
    keys = {"prompt": "prompt_embeddings"}  # our name -> theirs
    if peft_type == "PROMPT_TUNING":
        source, config, flags = "PEFT PROMPT_TUNING", DePTConfig(m, 0, _resolve_max_length(None, max_length)), {}
    else:
        source, keys = "DePT authors' PROMPT_TUNING_LORA", {**keys, "lora_A": AUTHORS_A, "lora_B": AUTHORS_B}
        data = {**AUTHORS_DEFAULTS, **data}
        config = DePTConfig(m, field(data, "r", config_file, "int", 0),
                            _resolve_max_length(field(data, "max_length", config_file, "int", 1), max_length),
                            field(data, "lora_alpha", config_file, "number"))
        load_a, load_b = (field(data, key, config_file, "bool") for key in ("load_lora_embeddings",
                                                                            "load_lora_embedding_B"))
        flags = {"lora_A": load_a, "lora_B": load_a and load_b}
    tensors = read_adapter_weights(path)
    header = tensors.header
    if set(header) - set(keys.values()):
        raise ValueError(f"{path}: unexpected tensors {sorted(set(header) - set(keys.values()))} "
                         f"(a {source} checkpoint holds {sorted(keys.values())})")
    if AUTHORS_B in header and AUTHORS_A not in header:
        raise ValueError(f"{path} stores lora_embedding_B but no lora_embedding_A; the DePT authors' loader "
                         "cannot read it either")
    prompt = header.get("prompt_embeddings")
    if prompt is None or len(prompt[1]) != 2 or prompt[1][0] != rows:
        found = "none" if prompt is None else f"shape {prompt[1]}"
        raise ValueError(f"{path}: expected prompt_embeddings with {rows} rows (num_virtual_tokens x "
                         f"num_transformer_submodules), found {found}")
    # Read: the prompt, and A / B where stored and their flags say so (as the authors' loader does).
    read = ["prompt", *(name for name, flag in flags.items() if flag and keys[name] in header)]
    _check_shapes({name: (m, prompt[1][1]) if name == "prompt" else header[keys[name]][1] for name in read},
                  config, dim, f"{source} checkpoint")
    expected = {**_expected_shapes(config, dim), "prompt": (rows, dim)}
    check_header(tensors.source, {keys[name]: header[keys[name]] for name in read},
                 {keys[name]: expected[name] for name in read})
    loaded = tensors.load([keys[name] for name in read])
    picked = {name: loaded[keys[name]] for name in read}
    picked["prompt"] = picked["prompt"][:m]  # encoder-decoder checkpoints keep an unused decoder copy after m rows
    return DePTCheckpoint(config, {name: picked.get(name) for name in TENSOR_NAMES}, source)
