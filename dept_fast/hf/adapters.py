"""Named adapters on one model, the active one, and which adapter each row of a call takes.

A model carries its DePT adapters in ``model.dept_adapters`` and its Prefix-Tuning adapters in
``model.prefix_adapters`` (``nn.ModuleDict`` by name, PEFT's convention; one name may have one of
each kind, which then act together). One name is active (the first attached, until
:func:`set_adapter`); ``model.dept`` and ``model.prefix_tuning`` are the active name's adapters.

A call runs every row with the active adapter, or, given ``adapter_names=[...]`` (one per row, as
PEFT's mixed LoRA batches), each row with its own: the name's adapters, or none for
:data:`BASE` ("__base__", the plain model). An unknown name is an error, never the base model.
``forward`` takes ``adapter_names`` as a keyword argument (it reaches every hook with the other
kwargs, and gradient checkpointing's recomputation too); ``generate`` takes it because the model's
``prepare_inputs_for_generation`` is wrapped to name it (:class:`PrepareInputsWithAdapterNames`):
generate() then keeps it among its model kwargs and passes it to every step's forward (and T5's
encoder call) as that call's own keyword argument. Nothing is read from a global or a context
variable, so a compiled forward (torch.compile traces no ``ContextVar``) sees the names it is given.
"""
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

BASE = "__base__"
DEPT, PREFIX = "dept", "prefix_tuning"
CONTAINERS = {DEPT: "dept_adapters", PREFIX: "prefix_adapters"}
"""Adapter kind -> the ``nn.ModuleDict`` on the model that holds its adapters by name."""
ALIASES = {DEPT: "dept", PREFIX: "prefix_tuning"}
"""Adapter kind -> the model attribute naming the active adapter of that kind."""
KIND_NAMES = {DEPT: "DePT", PREFIX: "prefix-tuning"}
ACTIVE_ATTR = "_dept_fast_active"
NAMES_KWARG = "adapter_names"
ROWS_KWARG = "dept_fast_adapter_names"
"""The forward (and generate) kwarg the rows' names travel under inside the model: set from
``adapter_names`` where a wrapper that takes that name for itself (PEFT) would drop it before the
model (:mod:`dept_fast.hf.peft_models`), and by the library's own internal passes (the shared
prompt's pass, the self-check's probes), which must not change what PEFT is told."""


class PrepareInputsWithAdapterNames:
    """``model.prepare_inputs_for_generation`` naming ``adapter_names``: generate() refuses model
    kwargs that neither this function nor (through its ``**kwargs``) the model's forward names, and
    hands every one it keeps to each step's call of this function; the names go on into that step's
    forward kwargs. A callable object, so ``copy.deepcopy(model)`` maps it onto the copy."""

    def __init__(self, prepare) -> None:
        self.prepare = prepare

    def __call__(self, *args, adapter_names: Optional[Sequence[str]] = None,
                 dept_fast_adapter_names: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, Any]:
        inputs = self.prepare(*args, **kwargs)
        if adapter_names is not None:
            inputs[NAMES_KWARG] = adapter_names
        if dept_fast_adapter_names is not None:
            inputs[ROWS_KWARG] = dept_fast_adapter_names
        return inputs


def call_names(kwargs: Dict[str, Any]) -> Optional[Sequence[str]]:
    """The rows' adapter names of the call these forward kwargs belong to (:data:`ROWS_KWARG`, else
    ``adapter_names``; None: the active adapter)."""
    names = kwargs.get(ROWS_KWARG)
    return names if names is not None else kwargs.get(NAMES_KWARG)


class RowAdapters(NamedTuple):
    """Which adapter of one kind each row of a call takes.

    ``adapters`` lists the distinct adapters of the call (in first-seen order); ``index`` (b,) int64
    gives each row's position in that list, -1 for a row without one; None means every row takes
    ``adapters[0]`` (a uniform batch). ``adapters`` empty: no row takes an adapter of this kind.
    """

    names: Tuple[str, ...]
    adapters: Tuple[nn.Module, ...]
    index: Optional[torch.Tensor]

    @property
    def uniform(self) -> bool:
        return self.index is None


def adapters_of(model: nn.Module, kind: str) -> Mapping[str, nn.Module]:
    """The model's adapters of ``kind`` by name (empty when it has none)."""
    return model._modules.get(CONTAINERS[kind]) or {}


def active_adapter(model: nn.Module) -> Optional[str]:
    """The name every row takes when a call gives no ``adapter_names`` (None before any adapter)."""
    return model.__dict__.get(ACTIVE_ATTR)


def adapter_names(model: nn.Module) -> List[str]:
    """Every adapter name on ``model`` (of either kind), in the order they were attached."""
    names = []
    for kind in CONTAINERS:
        names += [name for name in adapters_of(model, kind) if name not in names]
    return names


def add_adapter(model: nn.Module, kind: str, name: str, adapter: nn.Module) -> bool:
    """Register ``adapter`` as ``name`` of ``kind`` (the first adapter of a model becomes active).
    Returns whether it is the model's first adapter of this kind (its hooks are then needed)."""
    refuse_taken(model, kind, name)
    container = model._modules.get(CONTAINERS[kind])
    first = container is None
    if first:
        container = nn.ModuleDict()
        model.add_module(CONTAINERS[kind], container)
    container[name] = adapter
    if active_adapter(model) is None:
        model.__dict__[ACTIVE_ATTR] = name
    prepare = model.__dict__.get("prepare_inputs_for_generation")
    if hasattr(model, "prepare_inputs_for_generation") and not isinstance(prepare, PrepareInputsWithAdapterNames):
        model.__dict__["prepare_inputs_for_generation"] = PrepareInputsWithAdapterNames(
            model.prepare_inputs_for_generation)
    _update_aliases(model)
    return first


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every row of a call takes when the call gives no ``adapter_names``."""
    if name not in adapter_names(model):
        raise ValueError(f"{type(model).__name__} has no adapter named {name!r}; it has {adapter_names(model)}")
    model.__dict__[ACTIVE_ATTR] = name
    _update_aliases(model)


def _update_aliases(model: nn.Module) -> None:
    """``model.dept`` / ``model.prefix_tuning``: plain attributes (not submodules, so nothing is
    registered or saved twice) naming the active name's adapter of each kind."""
    active = active_adapter(model)
    for kind, alias in ALIASES.items():
        adapter = adapters_of(model, kind)[active] if active in adapters_of(model, kind) else None
        if adapter is None:
            model.__dict__.pop(alias, None)
        else:
            model.__dict__[alias] = adapter


def refuse_taken(model: nn.Module, kind: str, name: str) -> None:
    """Raise ValueError unless ``name`` is a valid adapter name that ``model`` has no ``kind`` adapter
    under (callers check before building or reading an adapter, :func:`add_adapter` again)."""
    if not isinstance(name, str) or not name or name == BASE or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', other than {BASE!r}; got {name!r}")
    if name in adapters_of(model, kind):
        raise ValueError(f"{type(model).__name__} already has a {KIND_NAMES[kind]} adapter named {name!r} "
                         f"(model.{CONTAINERS[kind]}[{name!r}]); attach under another adapter_name")


def row_adapters(model: nn.Module, kind: str, names: Optional[Sequence[str]], batch: int,
                 device: torch.device) -> RowAdapters:
    """Each row's adapter of ``kind`` for a call with ``adapter_names`` = ``names`` (None: the active one)."""
    container = adapters_of(model, kind)
    if names is None:
        active = active_adapter(model)
        return RowAdapters((active,), (container[active],), None) if active in container else RowAdapters((), (), None)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {names!r}")
    if len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows (one per row; beam search "
                         "and num_return_sequences > 1 expand the batch and are not supported with adapter_names)")
    known = adapter_names(model)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; {type(model).__name__} has {known} "
                         f"(and {BASE!r} for the plain model)")
    present = tuple(dict.fromkeys(n for n in names if n in container))
    if not present:
        return RowAdapters((), (), None)
    if len(present) == 1 and all(n == present[0] for n in names):
        return RowAdapters(present, (container[present[0]],), None)
    position = {name: i for i, name in enumerate(present)}
    index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.long, device=device)
    return RowAdapters(present, tuple(container[n] for n in present), index)
