"""DePT and Prefix-Tuning on a PEFT model (LoRA and PEFT's other weight tuners), and what a row's name means.

Where they attach. A ``PeftModel`` runs the transformers model inside it (``get_base_model()``):
its ``forward`` calls that model through the tuner, its ``generate()`` calls the model's own
``generate``, which calls the model. So ``apply_*``/``load_*`` given a ``PeftModel`` attach to that
model (:func:`unwrap`), whose hooks see both paths (hooks on the ``PeftModel`` itself would miss
every generation step), and return the ``PeftModel``. The model's embedding module is whatever PEFT
made of it: with LoRA on ``embed_tokens`` a LoRA embedding, whose output (LoRA delta included) DePT
adds its update to (:func:`~dept_fast.modules.dept_embedding.computes_own_rows`). Nothing is frozen
or unfrozen: PEFT has already chosen what trains (see :func:`dept_fast.hf.attach.attach`).

What a row's name means. ``adapter_names=[...]`` given to the ``PeftModel``'s forward or generate
names, per row, adapters of both libraries: a row takes the DePT / Prefix-Tuning adapters of that
name, and the LoRA adapter of that name if PEFT has one, else PEFT's active LoRA adapter(s);
``"__base__"`` takes neither (PEFT's meaning too). So one mixed batch can serve task-specific LoRA +
DePT adapters, named alike, or per-task DePT adapters over one shared LoRA adapter. PEFT takes the
keyword for itself and drops it before the model, so the :class:`NamesBridge` on the ``PeftModel``
(a forward pre-hook and a wrapper of its ``generate``) hands the rows' names to the model under
:data:`~dept_fast.hf.adapters.ROWS_KWARG` and PEFT its LoRA names -- none at all when every row
takes PEFT's active adapter, as PEFT refuses ``adapter_names`` in training mode. Refused, with a
``ValueError``: a name neither library has; per-row LoRA adapters in training mode (PEFT's own
limit); per-row LoRA adapters with a shared DePT prompt (its one prompt pass would run inside PEFT's
per-row routing, with a batch of its own).

Attached the other way round (``apply_dept`` first, then ``get_peft_model``), the adapters still run
on every call, with the active names only (PEFT drops ``adapter_names`` before the model sees it),
and PEFT has frozen every parameter but its own: :func:`unfreeze_adapters` makes the dept_fast
adapters' own parameters trainable again.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .adapters import BASE, DEPT, NAMES_KWARG, PREFIX, ROWS_KWARG, adapter_names, adapters_of

BRIDGE_ATTR = "_dept_fast_names_bridge"


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (duck-typed: PEFT need not be importable)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model") and hasattr(model, "active_peft_config")


def unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """(the model to attach to, the ``PeftModel`` around it or None)."""
    if not is_peft_model(model):
        return model, None
    if getattr(model.active_peft_config, "is_prompt_learning", False):
        raise ValueError(f"{type(model).__name__} holds PEFT prompt-learning adapters ({model.active_peft_config.peft_type}), "
                         "which feed the model prompts of their own; read their checkpoints with load_dept / "
                         "load_prefix_tuning on the plain model instead")
    return model.get_base_model(), model


def attach_through(model: nn.Module, attach: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``attach(the model to attach to)``, and the :class:`NamesBridge` on ``model`` if it is a
    ``PeftModel``; returns ``model`` (what the user passed)."""
    target, wrapper = unwrap(model)
    attach(target)
    if wrapper is not None:
        bridge(wrapper, target)
    return model


def bridge(wrapper: nn.Module, target: nn.Module) -> None:
    """Give ``wrapper`` (a ``PeftModel``) its :class:`NamesBridge` for ``target`` (once)."""
    if BRIDGE_ATTR in wrapper.__dict__:
        return
    names_bridge = NamesBridge(target)
    wrapper.__dict__[BRIDGE_ATTR] = names_bridge
    wrapper.register_forward_pre_hook(names_bridge, with_kwargs=True)
    wrapper.__dict__["generate"] = GenerateWithNames(wrapper.generate, names_bridge, wrapper)


class NamesBridge:
    """The ``PeftModel``'s forward pre-hook: the rows' names for the model inside, PEFT its LoRA
    names (see the module docstring). A callable object, so ``copy.deepcopy`` maps it onto a copy."""

    def __init__(self, target: nn.Module) -> None:
        self.target = target

    def __call__(self, wrapper: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        names = kwargs.get(NAMES_KWARG)
        if names is None:
            return None
        return args, self.split(wrapper, names, kwargs)

    def split(self, wrapper: nn.Module, names: Sequence[str], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``kwargs`` with the rows' names under ROWS_KWARG and PEFT's under ``adapter_names`` (or none)."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {names!r}")
        lora = set(wrapper.peft_config)
        ours = set(adapter_names(self.target))
        unknown = sorted({n for n in names if n != BASE and n not in ours and n not in lora})
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}: the model has dept_fast adapters {sorted(ours)} and "
                             f"PEFT adapters {sorted(lora)} (and {BASE!r} for the plain model)")
        kwargs = dict(kwargs)
        kwargs[ROWS_KWARG] = [n if n in ours else BASE for n in names]
        peft_names = self.lora_names(wrapper, names, lora)
        if peft_names is None:
            kwargs.pop(NAMES_KWARG)
        else:
            kwargs[NAMES_KWARG] = peft_names
        return kwargs

    def lora_names(self, wrapper: nn.Module, names: Sequence[str], lora: set) -> Optional[List[str]]:
        """PEFT's per-row names, or None where every row takes PEFT's active adapter(s)."""
        active = list(getattr(wrapper, "active_adapters", None) or [wrapper.active_adapter])
        per_row = [n if n in lora or n == BASE else None for n in names]  # None: the active adapter
        if all(n is None or [n] == active for n in per_row):
            return None
        if any(n is None for n in per_row) and len(active) != 1:
            raise ValueError(f"rows without a LoRA adapter of their name take PEFT's active one, but {active} are "
                             "active: name each row's LoRA adapter, or activate one")
        if wrapper.training:
            raise ValueError("PEFT takes per-row LoRA adapters (adapter_names naming LoRA adapters other than the "
                             f"active {active}, or '__base__') only in eval mode")
        if any(getattr(a, "share_prompt", False) for a in adapters_of(self.target, DEPT).values()):
            raise ValueError("per-row LoRA adapters do not go with a shared DePT prompt (its prompt pass would run "
                             "inside PEFT's per-row routing); attach DePT with share_prompt=False")
        return [active[0] if n is None else n for n in per_row]


class GenerateWithNames:
    """The ``PeftModel``'s ``generate`` with the :class:`NamesBridge` applied to its ``adapter_names``."""

    def __init__(self, generate, names_bridge: NamesBridge, wrapper: nn.Module) -> None:
        self.generate, self.names_bridge, self.wrapper = generate, names_bridge, wrapper

    def __call__(self, *args, **kwargs):
        names = kwargs.get(NAMES_KWARG)
        if names is not None:
            kwargs = self.names_bridge.split(self.wrapper, names, kwargs)
        return self.generate(*args, **kwargs)


def unfreeze_adapters(model: nn.Module) -> nn.Module:
    """Make every attached dept_fast adapter's own parameters trainable again (DePT: the prompt and, for
    rank > 0, A and B; Prefix-Tuning: its encoders), e.g. after ``get_peft_model`` froze them; the
    model's embeddings and other weights are left as they are. Returns ``model``."""
    target, _ = unwrap(model)
    for adapter in adapters_of(target, DEPT).values():
        adapter.prompt.requires_grad_(True)
        for p in (adapter.lora_A, adapter.lora_B):
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
    for adapter in adapters_of(target, PREFIX).values():
        adapter.requires_grad_(True)
    return model
