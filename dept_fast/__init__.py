"""dept_fast: fused Triton kernels for DePT and Prefix-Tuning soft-prompt fine-tuning.

    from dept_fast import FusedDePTEmbedding

Layout: ``dept_fast.ops`` (autograd Functions over the kernels, each with its PyTorch reference),
``dept_fast.modules`` (nn.Modules), ``dept_fast.hf`` (the transformers integration),
``dept_fast.checkpoint`` (checkpoint formats), ``dept_fast.kernels`` (Triton kernels, the top-level
``kernels/`` folder). Names are imported on first use, so ``import dept_fast`` stays light: the
transformers integration is loaded only when one of its names is used.
"""
import importlib
import os as _os

# Installed, ``dept_fast.kernels`` comes from the top-level ``kernels/`` folder (setup.py
# package_dir). Run from a source checkout without installing (``PYTHONPATH=.``), find it there.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and \
        _os.path.isfile(_os.path.join(_checkout, "kernels", "dept_forward.py")):
    __path__.append(_checkout)

_EXPORTS = {
    "FusedDePTEmbedding": "modules", "FusedPrefixEncoder": "modules", "PrefixTuning": "modules",
    "DePTEmbeddingFunction": "ops", "dept_embedding": "ops", "dept_embedding_reference": "ops",
    "apply_dept": "hf", "load_dept": "hf", "apply_prefix_tuning": "hf", "load_prefix_tuning": "hf",
    "serving": "hf", "set_adapter": "hf", "active_adapter": "hf", "param_groups": "optim", "budget": "budget", "trainable_parameters": "summary",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dept_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
