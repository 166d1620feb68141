"""Attaching as one step: either the adapter is attached and verified, or the model is as it was.

:func:`all_or_nothing` records, before an attach begins, what attaching may change on the model --
every module's attributes (its submodules, hooks, the tags the prefix route puts on attention
modules, the ``generate`` wrapper), every config object's attributes (the attention implementation,
the adapters' records) and every parameter's ``requires_grad`` -- and puts all of it back if the
attach raises (a refusal of the self-check included). Shallow: the objects themselves (parameters,
buffers, configs) are not copied, only which of them the model holds and their flags.
"""
import copy
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

from torch import nn


def _attributes(obj: Any) -> Dict[str, Any]:
    """``obj.__dict__`` with every dict-valued attribute (``_modules``, ``_parameters``, hook dicts)
    copied, so later changes made to them in place do not reach the record."""
    return {key: copy.copy(value) if isinstance(value, dict) else value for key, value in vars(obj).items()}


def _restore(obj: Any, attributes: Dict[str, Any]) -> None:
    for key, value in attributes.items():
        current = vars(obj).get(key)
        if isinstance(value, dict) and type(current) is type(value) and current is not value:
            current.clear()  # the dict object itself may be referenced elsewhere (e.g. by hook handles)
            current.update(value)
        else:
            vars(obj)[key] = value
    for key in set(vars(obj)) - set(attributes):
        del vars(obj)[key]


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Undo every change to ``model`` made inside the context if the context raises (then re-raise)."""
    modules = list(model.modules())
    configs = {id(c): c for c in (getattr(m, "config", None) for m in modules) if c is not None}
    for config in list(configs.values()):  # sub-configs (e.g. a text_config) hold attention settings too
        configs.update({id(c): c for c in vars(config).values() if type(c).__name__.endswith("Config")})
    saved: List[Tuple[Any, Dict[str, Any]]] = [(obj, _attributes(obj)) for obj in modules + list(configs.values())]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for obj, attributes in saved:
            _restore(obj, attributes)
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        raise
