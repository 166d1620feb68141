"""Adapters on models that FSDP (``fully_shard``, ``FullyShardedDataParallel``) or DeepSpeed ZeRO-3 shard.

The order is: attach the adapter to the plain model, then wrap. An engine manages the parameters it
finds when it wraps, so the adapter's join the rest (sharded, gathered for the forward, gradients
reduced across ranks). Attaching to an already wrapped model cannot be right (the new parameters
would be outside the engine: never reduced across ranks), so :func:`refuse_sharded` refuses it.

ZeRO-3 partitions every parameter: outside the engine's gathering it is a (0,) placeholder. The
engine gathers a module's own parameters while its forward (or backward) runs, and those registered
as its external parameters; :func:`gathered` is ``deepspeed.zero.GatheredParameters`` for reads
outside a forward (building an adapter around a model built under ``deepspeed.zero.Init``),
:func:`gathered_forward` gathers each module's own parameters for its forward (a probe pass before
the engine exists), and :func:`zero3_module` prepares an adapter module for its calls inside the
engine's forward; :func:`refuse_zero3` refuses an operation that reads several adapters' parameters
at once. Without ZeRO-3 parameters all of them do nothing. Nothing here imports an engine: a model
can only be wrapped by one whose module was imported already.
"""
import sys
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

APPLY_FIRST = ("attach the adapter to the plain model first, then wrap it (fully_shard / FullyShardedDataParallel / "
               "deepspeed.initialize, or the HF Trainer's FSDP / DeepSpeed config); an adapter attached afterwards "
               "would be outside the engine, its gradients never reduced across ranks")


def sharded_by(model: nn.Module) -> Optional[str]:
    """The engine that already wraps ``model`` or shards its parameters, in words, or None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    for module in model.modules():
        if fsdp is not None and isinstance(module, fsdp.FSDPModule):
            return "FSDP2 (fully_shard)"
        if fsdp is not None and isinstance(module, fsdp.FullyShardedDataParallel):
            return "FSDP (FullyShardedDataParallel)"
        if type(module).__name__ == "DeepSpeedEngine" or type(module._parameters).__name__ == "ZeROOrderedDict":
            return "DeepSpeed (deepspeed.initialize)"
    for p in model.parameters():
        if dtensor is not None and isinstance(p, dtensor.DTensor):
            return "FSDP2 (DTensor parameters)"
        if getattr(p, "_fsdp_flattened", False):
            return "FSDP (flat parameters)"
    return None


def refuse_sharded(model: nn.Module) -> None:
    """Raise ValueError when ``model`` is already wrapped or sharded by FSDP or a DeepSpeed engine.

    A model built under ``deepspeed.zero.Init`` and not yet given to ``deepspeed.initialize`` is
    not refused: its parameters are partitioned, but the engine that will manage them (the
    adapter's too) does not exist yet."""
    engine = sharded_by(model)
    if engine is not None:
        raise ValueError(f"this {type(model).__name__} is already sharded by {engine}; {APPLY_FIRST}")


def refuse_shards(tensors: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, ...]], what: str) -> None:
    """Raise ValueError when one of ``tensors`` (to be saved as ``what``) is not its full value: an
    FSDP2 DTensor, an FSDP shard or a ZeRO-3 placeholder (its shape is not ``shapes[name]``)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    for name, tensor in tensors.items():
        if (dtensor is not None and isinstance(tensor, dtensor.DTensor)) or tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(
                f"{what}: {name} is sharded (a {type(tensor).__name__} of shape {tuple(tensor.shape)}, the full one is "
                f"{tuple(shapes[name])}); save it where its full value is gathered, on every rank: inside "
                "model.unshard() (FSDP2), FullyShardedDataParallel.summon_full_params(model) (FSDP) or "
                "deepspeed.zero.GatheredParameters(list(adapter.parameters())) (ZeRO-3)")


def is_zero3(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (partitioned by ``deepspeed.zero.Init`` or an engine)."""
    return hasattr(p, "ds_id")


@contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the context, the ZeRO-3 parameters among ``params`` hold their full values (read only:
    changes are not written back). A no-op when there are none; parameters an enclosing context holds
    gathered already are left to it (DeepSpeed refuses to gather one twice)."""
    params = [p for p in params if is_zero3(p) and getattr(getattr(p, "ds_status", None), "name", None) != "AVAILABLE"]
    if not params:
        yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(params):
        yield


@contextmanager
def gathered_forward(module: nn.Module) -> Iterator[None]:
    """Within the context, every submodule of ``module`` holds its own ZeRO-3 parameters gathered while
    its forward runs (one module's at a time, as the engine would): for a pass through a model built
    under ``deepspeed.zero.Init`` before ``deepspeed.initialize``. A no-op without such parameters."""
    if not any(is_zero3(p) for p in module.parameters()):
        yield
        return
    open_scopes: List[ExitStack] = []

    def gather(submodule: nn.Module, args: tuple) -> None:
        scope = ExitStack()
        scope.enter_context(gathered(submodule.parameters(recurse=False)))
        open_scopes.append(scope)

    def release(submodule: nn.Module, args: tuple, output) -> None:
        open_scopes.pop().close()

    handles = [hook for submodule in module.modules()
               for hook in (submodule.register_forward_pre_hook(gather), submodule.register_forward_hook(release))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_scopes:  # a forward that raised left its modules' scopes open
            open_scopes.pop().close()


def refuse_zero3(modules: Iterable[nn.Module], what: str) -> None:
    """Raise ValueError when ``modules`` hold ZeRO-3 parameters: ``what`` reads several modules'
    parameters in one operation, outside any one module's forward, where the engine gathers none."""
    if any(is_zero3(p) for module in modules for p in module.parameters()):
        raise ValueError(f"{what} reads several adapters' parameters at once, which DeepSpeed ZeRO-3 does not "
                         "gather; under ZeRO-3 give each batch one adapter")


def zero3_module(module: nn.Module) -> nn.Module:
    """``module``, ready to be called inside a ZeRO-3 engine's forward; call it before each call.

    The engine gathers a module's own parameters for its forward and backward. An adapter module
    also reads parameters of its submodules directly (the word embeddings' weight, a projection's
    weight handed to a kernel): those are registered as its external parameters, so the engine
    gathers them with its own. Does nothing unless ``module`` has ZeRO-3 parameters."""
    if not any(is_zero3(p) for p in module.parameters()):
        return module
    from deepspeed.runtime.zero import register_external_parameter

    own = {id(p) for p in module.parameters(recurse=False)}
    registered = getattr(module, "_external_params", {})
    for p in module.parameters():
        if id(p) not in own and id(p) not in registered:
            register_external_parameter(module, p)
    return module
