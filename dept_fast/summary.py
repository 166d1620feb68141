"""A parameter summary of an adapted model, as PEFT's ``print_trainable_parameters()``."""
from typing import NamedTuple

from torch import nn


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts of a model; ``str()`` is PEFT's one-line summary."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent (0 for a model without parameters)."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count ``model``'s trainable and total parameters, a tensor shared between modules (tied
    embeddings, the word embeddings a DePT adapter wraps) once. ``print(trainable_parameters(model))``
    prints PEFT's summary line."""
    params = list(model.parameters())  # each shared Parameter once
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
