"""Optimizer parameter groups for DePT's two learning rates (soft prompt vs low-rank pair)."""
from typing import Any, Dict, List, Optional

from torch import nn

from .modules.dept_embedding import FusedDePTEmbedding


def param_groups(model: nn.Module, lr_prompt: float, lr_lowrank: float, weight_decay: float = 0.0,
                 lr_other: Optional[float] = None) -> List[Dict[str, Any]]:
    """Parameter groups for ``torch.optim`` (and the HF Trainer's ``optimizers=(opt, None)``).

    The DePT paper trains the prompt and the low-rank pair (A, B) with different learning rates
    (the prompt's is typically much larger). Every trainable prompt of every
    :class:`FusedDePTEmbedding` in ``model`` (a DePT model, a DDP wrapper of one, or the adapter
    itself) goes into group ``"dept_prompt"`` with ``lr_prompt``; every trainable ``lora_A``/``lora_B``
    into ``"dept_lowrank"`` with ``lr_lowrank``. Empty groups are left out (rank 0 has no low-rank pair).

    Any other trainable parameter (say, an unfrozen head) needs its own learning rate: pass
    ``lr_other`` to put them in group ``"other"``; without it they raise rather than go untrained.

    Returns:
        A list of dicts with keys ``params``, ``lr``, ``weight_decay`` and ``name``.
    """
    adapters = [m for m in model.modules() if isinstance(m, FusedDePTEmbedding)]
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no DePT adapter (FusedDePTEmbedding); use apply_dept first")
    prompt = [a.prompt for a in adapters if a.prompt.requires_grad]
    lowrank = [p for a in adapters for p in (a.lora_A, a.lora_B) if p.requires_grad]
    taken = {id(p) for p in prompt + lowrank}
    others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    if others and lr_other is None:
        names = ", ".join(n for n, _ in others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(f"{len(others)} trainable parameters are not part of the DePT adapter ({names}); "
                         "pass lr_other for them or freeze them")
    groups = [("dept_prompt", prompt, lr_prompt), ("dept_lowrank", lowrank, lr_lowrank),
              ("other", [p for _, p in others], lr_other)]
    return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": name}
            for name, params, lr in groups if params]
