"""``FusedPrefixEncoder``: the trainable per-layer key/value prefixes of Prefix-Tuning, and
:func:`grouped_key_values`, several encoders' prefixes in one launch."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import grouped_launch_available, grouped_prefix_kv_projection, prefix_kv_projection
from ..ops.checks import FLOAT_DTYPES

KeyValues = List[Tuple[torch.Tensor, torch.Tensor]]


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


class FusedPrefixEncoder(nn.Module):
    """Prefix-Tuning's prefixes (Li & Liang, 2021) for every attention layer of a model.

    ``forward()`` returns all layers' prefix keys and values as one (num_layers, 2, num_kv_heads,
    prefix_len, head_dim) tensor, the layout the prefix attention consumes (``[l, 0]`` keys,
    ``[l, 1]`` values of layer l; ``num_kv_heads`` x ``head_dim`` is the model's key/value layout,
    so grouped-query attention gets kv_heads, not query heads). Two parameterizations:

    * ``projection_dim=None``: the prefixes themselves are the parameter ``prefix``.
    * ``projection_dim=mid`` (512 by default, as in the original work): the training-time
      reparameterization Embedding(p, embed_dim) -> Linear(embed_dim, mid) -> tanh ->
      Linear(mid, num_layers * 2 * num_kv_heads * head_dim). The first Linear is a cuBLAS matmul;
      tanh, the second Linear and the scatter into the attention layout are one fused Triton kernel
      (one more pair for the backward), see ``kernels/prefix_kv.py``. :meth:`merge` evaluates the MLP
      once and keeps only the resulting prefixes, for inference (or to go on training them directly).

    Initialisation follows PEFT's ``PrefixEncoder``: ``nn.Embedding``'s N(0, 1) rows (the prefixes
    themselves without projection) and ``nn.Linear``'s default.

    Args:
        prefix_len: p, prefix slots per layer.
        num_layers: attention layers that take a prefix.
        num_kv_heads, head_dim: the layers' key/value heads and head width.
        projection_dim: width of the MLP's hidden layer, or None for no MLP.
        embed_dim: width of the MLP's input embedding (the model's hidden size in the original work);
            defaults to ``num_kv_heads * head_dim``. Ignored without projection.
        dtype, device: of the parameters (dtype None: torch's default dtype); float32, float16 or bfloat16.
    """

    def __init__(self, prefix_len: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection_dim: Optional[int] = 512, embed_dim: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        for name, value in (("prefix_len", prefix_len), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            _check_positive(name, value)
        for name, value in (("projection_dim", projection_dim), ("embed_dim", embed_dim)):
            _check_positive(name, value, allow_none=True)
        self.prefix_len = prefix_len
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.projection_dim = projection_dim
        self.embed_dim = embed_dim or num_kv_heads * head_dim
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"prefix parameters must be float32, float16 or bfloat16, got {dtype}")
        factory = {"dtype": dtype, "device": device}
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(self.layout, **factory))
        else:
            self.embedding = nn.Embedding(prefix_len, self.embed_dim, **factory)
            self.proj_in = nn.Linear(self.embed_dim, projection_dim, **factory)
            self.proj_out = nn.Linear(projection_dim, num_layers * 2 * num_kv_heads * head_dim, **factory)

    @staticmethod
    def parameter_shapes(prefix_len: int, num_layers: int, num_kv_heads: int, head_dim: int,
                         projection_dim: Optional[int], embed_dim: Optional[int]) -> Dict[str, Tuple[int, ...]]:
        """The state dict (name -> shape) of an encoder built with these arguments (checkpoints are
        checked against it before their tensors are loaded)."""
        if projection_dim is None:
            return {"prefix": (num_layers, 2, num_kv_heads, prefix_len, head_dim)}
        embed_dim = embed_dim or num_kv_heads * head_dim
        n_out = num_layers * 2 * num_kv_heads * head_dim
        return {"embedding.weight": (prefix_len, embed_dim), "proj_in.weight": (projection_dim, embed_dim),
                "proj_in.bias": (projection_dim,), "proj_out.weight": (n_out, projection_dim), "proj_out.bias": (n_out,)}

    @property
    def layout(self) -> Tuple[int, int, int, int, int]:
        """Shape of :meth:`forward`'s output: (num_layers, 2, num_kv_heads, prefix_len, head_dim)."""
        return (self.num_layers, 2, self.num_kv_heads, self.prefix_len, self.head_dim)

    @property
    def merged(self) -> bool:
        """True when the prefixes are the parameters (no MLP, or after :meth:`merge`)."""
        return self.projection_dim is None

    def forward(self) -> torch.Tensor:
        """All layers' prefixes, (num_layers, 2, num_kv_heads, prefix_len, head_dim)."""
        if self.merged:
            return self.prefix
        return prefix_kv_projection(self._hidden(), self.proj_out.weight, self.proj_out.bias, self.num_layers,
                                    self.num_kv_heads, self.head_dim)

    def _hidden(self) -> torch.Tensor:
        """The MLP's hidden layer before tanh, (prefix_len, projection_dim): the first Linear's output."""
        return self.proj_in(self.embedding.weight)

    def key_values(self) -> KeyValues:
        """Per layer, (key, value) each (1, num_kv_heads, prefix_len, head_dim): views of :meth:`forward`.

        ``unbind`` rather than indexing: its backward stacks the layers' gradients in one copy
        instead of scattering each into a zero tensor of the full size.
        """
        return _layer_pairs(self())

    @torch.no_grad()
    def merge(self) -> "FusedPrefixEncoder":
        """Evaluate the MLP once, keep only the prefixes (as parameter ``prefix``); no-op when merged."""
        if not self.merged:
            prefix = self().detach().clone()
            requires_grad = self.proj_out.weight.requires_grad
            del self.embedding, self.proj_in, self.proj_out
            self.projection_dim = None
            self.prefix = nn.Parameter(prefix, requires_grad=requires_grad)
        return self

    def extra_repr(self) -> str:
        return (f"prefix_len={self.prefix_len}, num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, projection_dim={self.projection_dim}, embed_dim={self.embed_dim}")


def _layer_pairs(prefixes: torch.Tensor) -> KeyValues:
    """(key, value) per layer, each (1, kv_heads, p, head_dim), of (layers, 2, kv_heads, p, head_dim)."""
    return [(k.unsqueeze(0), v.unsqueeze(0)) for k, v in (layer.unbind(0) for layer in prefixes.unbind(0))]


def _group_key(encoder: FusedPrefixEncoder) -> tuple:
    """What encoders evaluated in one grouped launch share: the layout, p, mid and the second Linear's
    dtypes and device (the first Linear runs per encoder, so its input width may differ)."""
    weight, bias = encoder.proj_out.weight, encoder.proj_out.bias
    return (encoder.prefix_len, encoder.projection_dim, encoder.num_layers, encoder.num_kv_heads, encoder.head_dim,
            encoder.proj_in.weight.dtype, weight.dtype, bias.dtype, weight.device)


def grouped_key_values(encoders: Sequence[FusedPrefixEncoder]) -> List[KeyValues]:
    """Per encoder, what ``encoder.key_values()`` returns, with the MLPs of same-shaped encoders evaluated
    together: the encoders of a model (e.g. "encoder", "decoder", "cross" of BART or T5) whose
    unmerged MLPs share prefix length, MLP width, layers, kv_heads, head_dim, dtypes and device get
    their second Linear (tanh, Linear, attention layout) in one launch, and one per backward kernel
    (``dept_fast.ops.grouped_prefix_kv_projection``); the first Linear stays one matmul per encoder.

    Merged encoders (the prefixes are the parameter), encoders no other one shares a shape with, and
    every encoder where no grouped launch runs (``dept_fast.ops.grouped_launch_available``: CPU without
    the interpreter, torch.compile, CUDA graph capture) are evaluated one by one, exactly as
    ``key_values()``. The encoders' own forward hooks do not run (their ``proj_in`` is
    called, and ``proj_out``'s parameters read, as ``forward()`` does).

    Args:
        encoders: the encoders, in any order; the same encoder twice is evaluated twice.

    Returns:
        A list as long as ``encoders``: for each, per layer, (key, value), each (1, kv_heads, p, head_dim).
    """
    for i, encoder in enumerate(encoders):
        if not isinstance(encoder, FusedPrefixEncoder):
            raise TypeError(f"encoders[{i}] must be a FusedPrefixEncoder, got {type(encoder).__name__}")
    results: List[Optional[KeyValues]] = [None] * len(encoders)
    groups: Dict[tuple, List[int]] = {}
    for i, encoder in enumerate(encoders):
        if encoder.merged:
            results[i] = encoder.key_values()
        else:
            groups.setdefault(_group_key(encoder), []).append(i)
    for members in groups.values():
        group = [encoders[i] for i in members]
        if len(group) == 1 or not grouped_launch_available(group[0].proj_out.weight):
            for i, encoder in zip(members, group):
                results[i] = encoder.key_values()
            continue
        first = group[0]
        hidden = torch.stack([encoder._hidden() for encoder in group])
        prefixes = grouped_prefix_kv_projection(hidden, [e.proj_out.weight for e in group],
                                                [e.proj_out.bias for e in group], first.num_layers,
                                                first.num_kv_heads, first.head_dim)
        # One unbind over every group's layers: its backward stacks their gradients in one copy.
        pairs = _layer_pairs(prefixes.flatten(0, 1))
        for g, i in enumerate(members):
            results[i] = pairs[g * first.num_layers:(g + 1) * first.num_layers]
    return results
