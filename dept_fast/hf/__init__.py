"""The transformers integration: the prefix attention function (``attention.py``), switching a model
onto it (``route.py``), token positions (``positions.py``), attaching adapters (``attach.py``), and
the thin per-method layers: DePT (``dept.py``, with the shared prompt in ``shared_prompt.py``) and
Prefix-Tuning (``prefix.py``)."""
from .adapters import active_adapter, set_adapter
from .dept import apply_dept, load_dept
from .peft_models import unfreeze_adapters
from .prefix import apply_prefix_tuning, load_prefix_tuning
from .shared_prompt import serving

__all__ = ["apply_dept", "load_dept", "apply_prefix_tuning", "load_prefix_tuning", "serving", "set_adapter",
           "active_adapter", "unfreeze_adapters"]
