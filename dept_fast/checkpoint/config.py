"""One config dataclass per adapter method, with ``to_json`` / ``from_json``.

``from_json`` validates every key it reads and raises ValueError naming the source (file) and the
key: a malformed config is refused, never half-read.
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

_MISSING = object()


def field(data: Dict[str, Any], key: str, source: str, kind: str, low: Optional[int] = None,
          default: Any = _MISSING) -> Any:
    """``data[key]`` checked to be of ``kind`` ("int", "number", "bool", "dict"; ints >= ``low``).

    A missing key takes ``default`` or is an error; None is accepted only where the default is None.
    """
    if key not in data:
        if default is _MISSING:
            raise ValueError(f"{source}: missing key {key!r}")
        return default
    value = data[key]
    if value is None and default is None:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          "bool": isinstance(value, bool),
          "dict": isinstance(value, dict)}[kind]
    if not ok:
        wanted = {"int": f"an int >= {low}" if low is not None else "an int", "number": "a finite number",
                  "bool": "true or false (a json boolean)", "dict": "a json object"}[kind]
        raise ValueError(f"{source}: key {key!r} must be {wanted}, got {value!r}")
    return float(value) if kind == "number" else value


@dataclass(frozen=True)
class DePTConfig:
    """A DePT adapter's sizes: m prompt tokens, rank r, max_length s (None: not recorded, PEFT
    prompt tuning), ``lora_alpha`` (scaling = lora_alpha / sqrt(r)) and the width d it was built for."""

    num_prompt_tokens: int
    rank: int
    max_length: Optional[int]
    lora_alpha: float = 8.0
    hidden_size: Optional[int] = None

    FORMAT = "dept_fast"
    FORMAT_VERSION = 1

    def to_json(self) -> Dict[str, Any]:
        return {"format": self.FORMAT, "format_version": self.FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Dict[str, Any], source: str) -> "DePTConfig":
        check_format(data, cls.FORMAT, cls.FORMAT_VERSION, source)
        return cls(field(data, "num_prompt_tokens", source, "int", 0), field(data, "rank", source, "int", 0),
                   field(data, "max_length", source, "int", 1), field(data, "lora_alpha", source, "number"),
                   field(data, "hidden_size", source, "int", 1, default=None))


@dataclass(frozen=True)
class StackConfig:
    """The prefixes of one attention stack: its layers' key/value layout and the encoder's MLP
    (``projection_dim`` None: the prefixes are the parameters)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    projection_dim: Optional[int] = None
    embed_dim: Optional[int] = None

    @property
    def layout(self):
        """(layers, kv_heads, head_dim)."""
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_json(cls, data: Dict[str, Any], source: str) -> "StackConfig":
        return cls(*(field(data, key, source, "int", 1) for key in ("num_layers", "num_kv_heads", "head_dim")),
                   *(field(data, key, source, "int", 1, default=None) for key in ("projection_dim", "embed_dim")))


POSITIONS = ("cache",)
"""The prefix position conventions an adapter may record (see :class:`PrefixTuningConfig`)."""


@dataclass(frozen=True)
class PrefixTuningConfig:
    """A Prefix-Tuning adapter: p prefix slots per layer, per attention group ("decoder"; encoder-decoders:
    any of "encoder", "decoder", "cross") a :class:`StackConfig`, and its position convention
    ``positions``: None, the model's own (a causal decoder's tokens sit after the prefix; an
    encoder-decoder's prefix has no position), or "cache": the prefix sits at positions 0..p-1 of the
    decoder's self-attention and the decoder's tokens after it, as in a pre-filled cache (PEFT's
    encoder-decoder prefixes). Recorded only when set, so a config without it reads as None."""

    prefix_len: int
    stacks: Dict[str, StackConfig]
    positions: Optional[str] = None

    FORMAT = "dept_fast.prefix_tuning"
    FORMAT_VERSION = 1

    def to_json(self) -> Dict[str, Any]:
        data = {"format": self.FORMAT, "format_version": self.FORMAT_VERSION, "prefix_len": self.prefix_len,
                "stacks": {name: asdict(stack) for name, stack in self.stacks.items()}}
        if self.positions is not None:
            data["positions"] = self.positions
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any], source: str) -> "PrefixTuningConfig":
        check_format(data, cls.FORMAT, cls.FORMAT_VERSION, source)
        stacks = field(data, "stacks", source, "dict")
        if not stacks or not all(isinstance(s, dict) for s in stacks.values()):
            raise ValueError(f"{source}: key 'stacks' must map stack names to json objects, got {stacks!r}")
        positions = data.get("positions")
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"{source}: key 'positions' must be one of {POSITIONS} or absent, got {positions!r}")
        return cls(field(data, "prefix_len", source, "int", 1),
                   {name: StackConfig.from_json(stack, f"{source} (stacks.{name})") for name, stack in stacks.items()},
                   positions)


def check_format(data: Dict[str, Any], name: str, version: int, source: str) -> None:
    """``data`` declares ``format`` = name and ``format_version`` = version."""
    if data.get("format") != name or data.get("format_version") != version:
        raise ValueError(f"{source} is not a {name} v{version} config: format={data.get('format')!r}, "
                         f"format_version={data.get('format_version')!r}")
