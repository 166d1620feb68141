"""An adapter's tensors inside a whole-model save: what ``model.save_pretrained``, the HF Trainer's
``save_model`` and its ``checkpoint-N`` folders write (``config.json`` plus ``model.safetensors``, a
sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``)."""
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from .files import bin_header, check_header, load_bin, load_tensors, read_header, read_json

MODEL_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
MODEL_CONFIG_KEY = "dept_fast"
"""The key of a transformers model's config under which attached adapters record their configs."""


@dataclass
class WholeModelFiles:
    """A saved model directory: its config (as json) and where each tensor lives."""

    path: str
    config_file: str
    config: Dict[str, Any]

    def adapter_config(self, kind: str, name: str) -> Dict[str, Any]:
        """The recorded config of adapter ``name`` of ``kind`` ("dept" or "prefix_tuning")."""
        records = self.config.get(MODEL_CONFIG_KEY)
        saved = records.get(kind) if isinstance(records, dict) else None
        if not isinstance(saved, dict) or not saved:
            raise FileNotFoundError(f"{self.config_file} records no {kind} adapter (no {MODEL_CONFIG_KEY!r}.{kind} "
                                    "key): the model was saved without one")
        if name not in saved:
            raise ValueError(f"{self.config_file} records no {kind} adapter named {name!r}; it has {sorted(saved)} "
                             "(pass adapter_name)")
        if not isinstance(saved[name], dict):
            raise ValueError(f"{self.config_file}: {MODEL_CONFIG_KEY}.{kind}.{name} must be a json object")
        return saved[name]

    def _file_of(self) -> Dict[str, str]:
        index = os.path.join(self.path, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            return {key: os.path.join(self.path, file) for key, file in weight_map.items()}
        single = os.path.join(self.path, SAFETENSORS)
        if os.path.isfile(single):
            return {key: single for key in read_header(single)[0]}
        raise FileNotFoundError(f"{self.path} has {MODEL_CONFIG} but none of {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN}")

    def load(self, keys: Dict[str, str], shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, torch.Tensor]:
        """Tensors ``keys[name]`` (model state-dict names) by adapter name, after checking each one's
        dtype and shape ``shapes[name]`` in the file header."""
        if os.path.isfile(os.path.join(self.path, BIN)) and not os.path.isfile(os.path.join(self.path, SAFETENSORS)) \
                and not os.path.isfile(os.path.join(self.path, SAFETENSORS_INDEX)):
            file = os.path.join(self.path, BIN)
            tensors = load_bin(file)  # memory-mapped
            check_header(file, bin_header(tensors), {keys[name]: shape for name, shape in shapes.items()})
            return {name: tensors[key] for name, key in keys.items()}
        files = self._file_of()
        missing = [key for key in keys.values() if key not in files]
        if missing:
            raise ValueError(f"{self.path}: the saved model holds no tensors {missing}")
        out = {}
        for name, key in keys.items():
            header = read_header(files[key])[0]
            check_header(files[key], header, {key: shapes[name]})
            out[name] = load_tensors(files[key], [key])[key]
        return out


def find_whole_model(path: str) -> Optional[WholeModelFiles]:
    """The saved model in directory ``path``, or None when it has no ``config.json``."""
    config_file = os.path.join(path, MODEL_CONFIG)
    if not os.path.isfile(config_file):
        return None
    return WholeModelFiles(path, config_file, read_json(config_file))
