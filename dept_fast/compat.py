"""The transformers API names that differ between the releases dept_fast supports (>= 5.15).

transformers 5.24 renamed gradient checkpointing to activation checkpointing
(``model.activation_checkpointing_enable``, ``TrainingArguments(activation_checkpointing=...)``)
and the generation cache's argument of ``forward``/``generate`` from ``past_key_values`` to
``cache``. There the old names still work but raise a FutureWarning; before it the new ones do not
exist. Each helper here takes whichever name the installed release has.
"""
import dataclasses
import inspect
from typing import Any, Dict

from torch import nn


def enable_activation_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> nn.Module:
    """Turn on activation (gradient) checkpointing of a transformers model; returns the model.

    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (e.g. ``use_reentrant=False``).
    Calls ``model.activation_checkpointing_enable`` (transformers >= 5.24) or, where that does not
    exist, ``model.gradient_checkpointing_enable``.
    """
    kwargs = checkpoint_kwargs or None
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def checkpointing_arguments(**checkpoint_kwargs: Any) -> Dict[str, Any]:
    """``TrainingArguments`` keywords that turn activation checkpointing on, under this release's names:
    ``TrainingArguments(..., **checkpointing_arguments(use_reentrant=False))``."""
    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)} \
        else "gradient"
    arguments: Dict[str, Any] = {f"{prefix}_checkpointing": True}
    if checkpoint_kwargs:
        arguments[f"{prefix}_checkpointing_kwargs"] = dict(checkpoint_kwargs)
    return arguments


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` and ``model.generate`` take a generation cache:
    ``"cache"`` (transformers >= 5.24) or ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
