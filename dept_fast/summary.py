"""A parameter summary of an adapted model (as PEFT's ``print_trainable_parameters``)."""
from typing import NamedTuple

from torch import nn


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts of a model (shared tensors counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count ``model``'s trainable and total parameters; ``print(trainable_parameters(model))`` prints
    PEFT's one-line summary."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
