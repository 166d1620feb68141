"""An adapter inside a whole-model save: what ``model.save_pretrained``, the HF Trainer's
``save_model`` and its ``checkpoint-N`` folders write. ``config.json`` records each attached
adapter's config under ``"dept_fast"`` (written there when the adapter is attached), and the model's
weights (``model.safetensors``, shards listed in ``model.safetensors.index.json``, or the same as
``pytorch_model*.bin`` from older transformers) hold the adapter's tensors under its module path
(``dept_adapters.<name>.prompt``, ``prefix_adapters.<name>.encoders.decoder.prefix``, ...)."""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .config import field
from .files import Tensors, read_json

MODEL_CONFIG = "config.json"
MODEL_CONFIG_KEY = "dept_fast"
"""The key of a transformers model's config under which attached adapters record their configs."""
WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
"""(index of shards, single file), in the order they are looked for."""


@dataclass
class WholeModel:
    """A saved model directory and its ``config.json``."""

    path: str
    config_file: str
    config: Dict[str, Any]

    def adapter_config(self, kind: str, name: str) -> Tuple[Dict[str, Any], str]:
        """(the config recorded for adapter ``name`` of ``kind`` ("dept" or "prefix_tuning"), where it
        was read); FileNotFoundError when the model was saved without such an adapter, ValueError when
        a record is not a json object."""
        recorded = field(self.config, MODEL_CONFIG_KEY, self.config_file, "dict", default=None) or {}
        of_kind = field(recorded, kind, f"{self.config_file} ({MODEL_CONFIG_KEY})", "dict", default=None) or {}
        if not of_kind:
            raise FileNotFoundError(f"{self.config_file} records no {kind} adapter (no {MODEL_CONFIG_KEY!r}.{kind} "
                                    "key): the model was saved without one")
        source = f"{self.config_file} ({MODEL_CONFIG_KEY}.{kind}.{name})"
        data = field(of_kind, name, source, "dict", default=None)
        if data is None:
            raise FileNotFoundError(f"{self.config_file} records no {kind} adapter named {name!r}; it has "
                                    f"{sorted(of_kind)} (pass adapter_name)")
        return data, source

    def tensors(self, prefix: str) -> Tensors:
        """The saved tensors whose names start with ``prefix``, keyed without it (headers only so far)."""
        return Tensors(self._files(prefix), prefix, source=f"saved model {self.path}")

    def _files(self, prefix: str) -> List[str]:
        """The weight files that hold tensors named ``prefix...`` (of a sharded save, only those)."""
        for index_name, single_name in WEIGHTS:
            index = os.path.join(self.path, index_name)
            if os.path.isfile(index):
                weight_map = field(read_json(index), "weight_map", index, "dict")
                if not all(isinstance(file, str) for file in weight_map.values()):
                    raise ValueError(f"{index}: key 'weight_map' must map tensor names to file names")
                files = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
                return [os.path.join(self.path, os.path.basename(file)) for file in files]
            if os.path.isfile(os.path.join(self.path, single_name)):
                return [os.path.join(self.path, single_name)]
        raise FileNotFoundError(f"{self.path} has {MODEL_CONFIG} but no model weights "
                                f"({', '.join(name for pair in WEIGHTS for name in pair)})")


def find_whole_model(path: str) -> Optional[WholeModel]:
    """The saved model in directory ``path``, or None when it has no ``config.json``."""
    config_file = os.path.join(path, MODEL_CONFIG)
    if not os.path.isfile(config_file):
        return None
    return WholeModel(path, config_file, read_json(config_file))
