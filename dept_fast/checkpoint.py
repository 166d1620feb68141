"""Saving and loading DePT adapters: our format, the DePT authors' and PEFT's prompt tuning.

Our format (written by ``FusedDePTEmbedding.save_pretrained``), a directory with
    dept_config.json        {"format": "dept_fast", "format_version": 1, "num_prompt_tokens": m,
                             "rank": r, "max_length": s, "lora_alpha": alpha, "hidden_size": d}
    dept_model.safetensors  prompt (m, d), lora_A (s, r), lora_B (r, d), in their training dtype.

Read as well (a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` or
``adapter_model.bin``; ``.bin`` files go through ``torch.load(weights_only=True)``, which unpickles
tensors and plain containers only):
* the DePT authors' ``PROMPT_TUNING_LORA`` (github.com/ZhengxiangShi/DePT): tensors
  ``prompt_embeddings`` (num_virtual_tokens x num_transformer_submodules rows, the first
  num_virtual_tokens used), ``prompt_encoder.lora_embedding_A`` (max_length, r) and
  ``prompt_encoder.lora_embedding_B`` (r, d); config ``num_virtual_tokens``, ``r``, ``lora_alpha``,
  ``max_length``. As in their loader, A and B are read only when ``load_lora_embeddings`` (and B only
  when ``load_lora_embedding_B``) is true; a B that is not read stays at its zero initialisation,
  so the update is zero, which is what their code computes;
* PEFT ``PROMPT_TUNING``: ``prompt_embeddings`` only (rank 0); PEFT records no max_length, so the
  caller supplies it.
"""
import json
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .embedding import FusedDePTEmbedding

CONFIG_NAME = "dept_config.json"
WEIGHTS_NAME = "dept_model.safetensors"
FORMAT_VERSION = 1
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
AUTHORS_A, AUTHORS_B = "prompt_encoder.lora_embedding_A", "prompt_encoder.lora_embedding_B"
# Defaults of the DePT authors' PromptTuningLoRAConfig, for fields their json may leave out.
AUTHORS_DEFAULTS = {"r": 8, "lora_alpha": 8, "max_length": 256, "load_lora_embeddings": True,
                    "load_lora_embedding_B": True}

PathLike = Union[str, os.PathLike]


@dataclass
class DePTState:
    """An adapter as read from disk. ``lora_A``/``lora_B`` None: keep the fresh initialisation."""

    num_prompt_tokens: int
    rank: int
    max_length: Optional[int]
    lora_alpha: float
    prompt: torch.Tensor
    lora_A: Optional[torch.Tensor]
    lora_B: Optional[torch.Tensor]
    source: str


def save_embedding(adapter: FusedDePTEmbedding, path: PathLike) -> None:
    """Write ``adapter``'s prompt, lora_A, lora_B and config into directory ``path`` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    config = {"format": "dept_fast", "format_version": FORMAT_VERSION,
              "num_prompt_tokens": adapter.num_prompt_tokens, "rank": adapter.rank,
              "max_length": adapter.max_length, "lora_alpha": adapter.lora_alpha,
              "hidden_size": adapter.embedding_dim}
    tensors = {name: getattr(adapter, name).detach().cpu().contiguous() for name in ("prompt", "lora_A", "lora_B")}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_embedding(path: PathLike, word_embeddings: nn.Embedding,
                   max_length: Optional[int] = None) -> FusedDePTEmbedding:
    """Read the adapter in directory ``path`` (any supported format) around ``word_embeddings``."""
    return build_embedding(read_checkpoint(path), word_embeddings, max_length)


def read_checkpoint(path: PathLike) -> DePTState:
    """Read an adapter directory in our format, the DePT authors' or PEFT prompt tuning."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (a DePT checkpoint is a directory)")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return _read_ours(path)
    if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
        return _read_peft(path)
    raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (dept_fast) nor {PEFT_CONFIG_NAME} "
                            "(DePT authors' / PEFT)")


def build_embedding(state: DePTState, word_embeddings: nn.Embedding,
                    max_length: Optional[int] = None) -> FusedDePTEmbedding:
    """A FusedDePTEmbedding around ``word_embeddings`` holding ``state``'s tensors (in their saved dtype).

    ``max_length`` is needed only when the checkpoint does not record one (PEFT prompt tuning).
    """
    if state.max_length is not None and max_length is not None and max_length != state.max_length:
        raise ValueError(f"the checkpoint's max_length is {state.max_length}; got max_length={max_length}")
    max_length = state.max_length if state.max_length is not None else max_length
    if max_length is None:
        raise ValueError(f"this {state.source} checkpoint records no max_length; pass max_length "
                         "(the longest input the adapter accepts)")
    adapter = FusedDePTEmbedding(word_embeddings, state.num_prompt_tokens, state.rank, max_length, state.lora_alpha)
    device = word_embeddings.weight.device
    for name in ("prompt", "lora_A", "lora_B"):
        tensor = getattr(state, name)
        if tensor is None:
            continue
        expected = tuple(getattr(adapter, name).shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{state.source} checkpoint: {name} has shape {tuple(tensor.shape)}, expected {expected} "
                             f"(m={state.num_prompt_tokens}, r={state.rank}, s={max_length}, "
                             f"d={adapter.embedding_dim} from the model's embeddings)")
        # A copy of its own: tensors read from one file may share a buffer (zero-size ones alias their
        # neighbours' address, which the Triton interpreter mistakes for the same storage).
        setattr(adapter, name, nn.Parameter(tensor.to(device=device, copy=True)))
    return adapter


def _read_json(file: str) -> dict:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _read_ours(path: PathLike) -> DePTState:
    config = _read_json(os.path.join(path, CONFIG_NAME))
    if config.get("format") != "dept_fast" or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{CONFIG_NAME} in {path} is not a dept_fast v{FORMAT_VERSION} config: "
                         f"format={config.get('format')!r}, format_version={config.get('format_version')!r}")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    _check_keys(tensors, {"prompt", "lora_A", "lora_B"}, {"prompt", "lora_A", "lora_B"}, path)
    return DePTState(config["num_prompt_tokens"], config["rank"], config["max_length"], config["lora_alpha"],
                     tensors["prompt"], tensors["lora_A"], tensors["lora_B"], source="dept_fast")


def _read_peft(path: PathLike) -> DePTState:
    config = _read_json(os.path.join(path, PEFT_CONFIG_NAME))
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        raise ValueError(f"{PEFT_CONFIG_NAME} in {path} has peft_type {peft_type!r}; load_dept reads "
                         "PROMPT_TUNING_LORA (DePT authors) and PROMPT_TUNING (PEFT)")
    tensors = _read_peft_weights(path)
    m = config["num_virtual_tokens"]
    prompt = tensors["prompt_embeddings"] if "prompt_embeddings" in tensors else None
    rows = m * (config.get("num_transformer_submodules") or 1)
    if prompt is None or prompt.dim() != 2 or prompt.shape[0] != rows:
        found = "none" if prompt is None else f"shape {tuple(prompt.shape)}"
        raise ValueError(f"{path}: expected prompt_embeddings with {rows} rows (num_virtual_tokens x "
                         f"num_transformer_submodules), found {found}")
    prompt = prompt[:m]  # encoder-decoder checkpoints keep an unused decoder copy after the first m rows
    if peft_type == "PROMPT_TUNING":
        _check_keys(tensors, {"prompt_embeddings"}, {"prompt_embeddings"}, path)
        return DePTState(m, 0, None, 8.0, prompt, None, None, source="PEFT PROMPT_TUNING")

    config = {**AUTHORS_DEFAULTS, **config}
    _check_keys(tensors, {"prompt_embeddings", AUTHORS_A, AUTHORS_B}, {"prompt_embeddings"}, path)
    lora_A = tensors.get(AUTHORS_A) if config["load_lora_embeddings"] else None
    lora_B = tensors.get(AUTHORS_B) if config["load_lora_embeddings"] and config["load_lora_embedding_B"] else None
    if lora_A is None and lora_B is not None:
        raise ValueError(f"{path} stores lora_embedding_B but no lora_embedding_A; the DePT authors' loader "
                         "cannot read it either")
    return DePTState(m, config["r"], config["max_length"], float(config["lora_alpha"]), prompt, lora_A, lora_B,
                     source="DePT authors' PROMPT_TUNING_LORA")


def _read_peft_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    safetensors_file, bin_file = (os.path.join(path, name) for name in PEFT_WEIGHTS_NAMES)
    if os.path.isfile(safetensors_file):
        return load_file(safetensors_file)
    if not os.path.isfile(bin_file):
        raise FileNotFoundError(f"{path} has {PEFT_CONFIG_NAME} but neither of {PEFT_WEIGHTS_NAMES}")
    try:
        tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{bin_file} holds more than tensors; refusing to unpickle it "
                         f"(torch.load with weights_only=True): {err}") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{bin_file} is not a dict of tensors")
    return tensors


def _check_keys(tensors: Dict[str, torch.Tensor], allowed: set, required: set, path: PathLike) -> None:
    missing, unexpected = required - set(tensors), set(tensors) - allowed
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)} "
                         f"(a DePT adapter holds {sorted(allowed)})")

