"""Checkpoint files: crash-safe writes, header-first reads.

A dept_fast checkpoint is a directory with a json config and a safetensors file. A save writes the
tensors file first, with the config in its header, then the json; each through a temporary file
that is flushed to disk and renamed into place (``os.replace``, atomic), and both carry the same
random ``save_id``. A reader takes the json when its ``save_id`` matches the tensors' (so a
hand-edited json is honoured), and the header's copy when it does not: that is a save interrupted
between its two renames, whose tensors are the new ones. So a save that fails or is interrupted at
any point leaves either the previous checkpoint or the new one, never new tensors beside an old
config; a failed save removes its temporary file.

Reads look at the tensors' header (names, dtypes, shapes) before any tensor is loaded, so a config
or file that claims absurd sizes is refused before memory is allocated for it.
"""
import json
import os
import pickle
import tempfile
import uuid
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

CONFIG_METADATA_KEY = "dept_fast_config"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# safetensors dtype names -> torch dtypes accepted for adapter tensors.
FLOAT_DTYPE_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Header = Dict[str, Tuple[str, Tuple[int, ...]]]
"""Tensor name -> (safetensors dtype name, shape)."""
Config = TypeVar("Config")


# ---------------------------------------------------------------------------------------------
# Writing


def _write_atomically(file: str, data: bytes) -> None:
    """Write ``data`` to ``file`` through a temporary file in the same directory, flushed to disk and
    then renamed over ``file`` (``os.replace`` is atomic): readers see the old or the new content.
    On any failure (KeyboardInterrupt included) the temporary file is removed and ``file`` is untouched."""
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", suffix=".tmp",
                                         dir=os.path.dirname(file) or ".")
    try:
        with open(handle, "wb") as f:  # closes ``handle``, also when the write fails
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, file)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _sync_directory(directory: str) -> None:
    """Flush a directory's entries (the renames) to disk where the platform allows it."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: "os.PathLike[str] | str", tensors: Dict[str, torch.Tensor], config: Dict[str, Any],
                    weights_name: str, config_name: str) -> None:
    """Write ``tensors`` (with ``config`` in the header) and ``config`` as json into directory ``path``
    (see the module docstring for why this order and the ``save_id``)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    text = json.dumps({**config, "save_id": uuid.uuid4().hex}, indent=2)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _write_atomically(os.path.join(path, weights_name),
                      save(tensors, metadata={"format": "pt", CONFIG_METADATA_KEY: text}))
    _write_atomically(os.path.join(path, config_name), text.encode("utf-8"))
    _sync_directory(path)


# ---------------------------------------------------------------------------------------------
# Reading


class Tensors:
    """Tensors stored in safetensors or ``.bin`` files (one, or a sharded save's several): the
    ``header`` of those whose names start with ``prefix`` (keyed without it) is read before any
    tensor is; :meth:`load` then loads the named ones. ``source`` names the files in messages.

    ``.bin`` files go through ``torch.load(weights_only=True, mmap=True)``: tensors and plain
    containers only (anything else is refused), memory-mapped (nothing is read until used).
    """

    def __init__(self, files: Sequence[str], prefix: str = "", source: Optional[str] = None) -> None:
        self.source = source or files[0]
        self.header: Header = {}
        self.metadata: Dict[str, str] = {}  # the safetensors header's metadata (of the last file)
        self._where: Dict[str, Tuple[str, str, Optional[Dict[str, torch.Tensor]]]] = {}
        for file in files:
            if file.endswith(".bin"):
                state = _load_bin(file)
                header = {key: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for key, t in state.items()}
            else:
                state = None
                header, self.metadata = _read_safetensors_header(file)
            for key, entry in header.items():
                if key.startswith(prefix):
                    self.header[key[len(prefix):]] = entry
                    self._where[key[len(prefix):]] = (file, key, state)

    def load(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """The named tensors (check the header first), each with memory of its own allocated by torch
        (never a view of a memory-mapped file): safetensors' tensors sit at the file's byte offsets,
        and CPU matmuls of unaligned operands can round differently from those of the tensors that
        were saved, so a loaded adapter would not reproduce the saved one's outputs bit for bit."""
        out = {}
        for name in names:
            file, key, state = self._where[name]
            if state is not None:
                out[name] = state[key].clone()
            else:
                with safe_open(file, "pt") as f:
                    out[name] = f.get_tensor(key).clone()
        return out


_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPE_NAMES.items()}


def _read_safetensors_header(file: str) -> Tuple[Header, Dict[str, str]]:
    try:
        with safe_open(file, "pt") as f:
            header = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
            return header, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is not a readable safetensors file: {error}") from error


def _load_bin(file: str) -> Dict[str, torch.Tensor]:
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{file} holds more than tensors; refusing to unpickle it "
                         f"(torch.load with weights_only=True): {error}") from error
    except RuntimeError as error:  # not a zip-format torch file, or tensors outside their storage
        raise ValueError(f"{file} is not a torch state dict: {error}") from error
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{file} is not a dict of tensors")
    return tensors


def check_header(source: str, header: Header, expected: Dict[str, Tuple[int, ...]],
                 optional: Iterable[str] = ()) -> None:
    """``header`` holds exactly the ``expected`` tensors (those named in ``optional`` may be absent),
    each with its shape and a float dtype; ValueError naming ``source``, the tensor and what was
    found otherwise (checked before anything is loaded)."""
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected} (expected {sorted(expected)})")
    for name, shape in expected.items():
        if name not in header:
            if name in optional:
                continue
            raise ValueError(f"{source}: missing tensor {name!r} (found {sorted(header)})")
        dtype, found = header[name]
        if dtype not in FLOAT_DTYPE_NAMES:
            raise ValueError(f"{source}: tensor {name!r} has dtype {dtype}; adapter tensors must be "
                             "float32, float16 or bfloat16")
        if found != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {found}, expected {tuple(shape)}")


def read_json(file: str) -> Dict[str, Any]:
    """A json object from ``file``; ValueError naming the file when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid json: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a json object, got {type(data).__name__}")
    return data


def is_saved(path: str, config_name: str, weights_name: str) -> bool:
    """Whether directory ``path`` holds a checkpoint :func:`save_checkpoint` wrote (or began to: the
    tensors come first, with the config in their header)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in (config_name, weights_name))


def read_saved(path: str, config_name: str, weights_name: str,
               parse: Callable[[Dict[str, Any], str], Config]) -> Tuple[Config, Tensors]:
    """(config, tensors) of a checkpoint :func:`save_checkpoint` wrote, the config parsed by
    ``parse(data, source)`` from the json or the header (see the module docstring)."""
    weights, json_file = os.path.join(path, weights_name), os.path.join(path, config_name)
    data = read_json(json_file) if os.path.isfile(json_file) else None
    if not os.path.isfile(weights):
        if data is not None:
            parse(data, json_file)  # a malformed config is named before the missing file
        raise FileNotFoundError(f"{path} has no {weights_name}")
    tensors = Tensors([weights])
    stored = _config_in_header(weights, tensors.metadata)
    if data is not None and (stored is None or data.get("save_id") == stored.get("save_id")):
        return parse(data, json_file), tensors
    if stored is None:
        raise FileNotFoundError(f"{path} has {weights_name} but no {config_name}, and no config in its header")
    return parse(stored, f"{weights} (the config in its header)"), tensors


def _config_in_header(file: str, metadata: Dict[str, str]) -> Optional[Dict[str, Any]]:
    """The config a dept_fast save wrote into ``file``'s header, or None if there is none."""
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: the config in its header is not valid json: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{file}: the config in its header must be a json object")
    return config


def read_adapter_weights(path: str) -> Tensors:
    """The tensors of a PEFT-style adapter directory (``adapter_model.safetensors`` or ``.bin``)."""
    for name in PEFT_WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return Tensors([os.path.join(path, name)])
    raise FileNotFoundError(f"{path} has {PEFT_CONFIG_NAME} but neither of {PEFT_WEIGHTS_NAMES}")
