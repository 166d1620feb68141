"""``PrefixTuning``: the Prefix-Tuning adapter of one model, one encoder per attention stack."""
import os
from typing import Dict, Optional, Union

from torch import nn

from .prefix_encoder import FusedPrefixEncoder


class PrefixTuning(nn.Module):
    """The prefixes attached to a model as ``model.prefix_tuning``: ``encoders[group]`` per attention
    group, each its own MLP (``"decoder"`` for causal decoders; for encoder-decoders ``"encoder"``,
    ``"decoder"`` and ``"cross"``: the encoder's and the decoder's self-attention and the decoder's
    cross-attention, or those chosen at attach).

    Use :meth:`merge` after training (evaluates each MLP once, keeps the prefixes) and
    :meth:`save_pretrained` to write a checkpoint that :func:`dept_fast.load_prefix_tuning` reads.
    """

    def __init__(self, encoders: Dict[str, FusedPrefixEncoder], positions: Optional[str] = None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.positions = positions
        """The position convention (:class:`~dept_fast.checkpoint.config.PrefixTuningConfig`): None, the
        model's own; "cache": PEFT's encoder-decoder prefixes, at positions 0..p-1 of the decoder's
        self-attention, the decoder's tokens after them."""

    @property
    def prefix_len(self) -> int:
        return next(iter(self.encoders.values())).prefix_len

    def merge(self) -> "PrefixTuning":
        """Merge every encoder (see :meth:`FusedPrefixEncoder.merge`)."""
        for encoder in self.encoders.values():
            encoder.merge()
        return self

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write ``dept_prefix_config.json`` and ``dept_prefix.safetensors`` into directory ``path``
        (crash-safe: an interrupted save leaves the previous checkpoint or this one)."""
        from ..checkpoint.prefix import save_prefix

        save_prefix(self, path)
