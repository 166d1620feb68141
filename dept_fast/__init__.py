"""dept_fast: fused Triton kernels for DePT and Prefix-Tuning soft-prompt fine-tuning.

    from dept_fast import FusedDePTEmbedding

Layout: ``dept_fast.ops`` (autograd Functions over the kernels, each with its PyTorch reference),
``dept_fast.modules`` (nn.Modules), ``dept_fast.hf`` (the transformers integration),
``dept_fast.checkpoint`` (checkpoint formats), ``dept_fast.kernels`` (Triton kernels, the top-level
``kernels/`` folder). Names are imported on first use, so ``import dept_fast`` stays light: the
transformers integration is loaded only when one of its names is used.
"""
import importlib
import importlib.abc
import importlib.util
import os as _os
import sys as _sys


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds exactly ``dept_fast.kernels`` in the checkout's top-level ``kernels/`` folder.

    Installed as a wheel, setup.py's ``package_dir`` puts the folder inside the package. Run from a
    source checkout (``PYTHONPATH=<checkout>``, or installed editable, whose finder maps the name to
    the checkout it was installed from), this finder, first on ``sys.meta_path``, answers for that
    one name only, with the ``kernels/`` beside this ``dept_fast``: the kernels always come from the
    checkout the package itself came from (a second checkout on ``PYTHONPATH`` beside an editable
    install of the first does not mix the two), the package's ``__path__`` holds the package alone
    (no ``dept_fast.setup``, ``dept_fast.bench``, ...) and the folder never becomes a top-level
    ``kernels`` (the name of a PyPI package that transformers probes for).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, _os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


_checkout_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and \
        _os.path.isfile(_os.path.join(_checkout_kernels, "dept_forward.py")) and \
        not any(type(finder).__qualname__ == _CheckoutKernels.__qualname__ and type(finder).__module__ == __name__
                for finder in _sys.meta_path):  # once, importlib.reload included
    _sys.meta_path.insert(0, _CheckoutKernels(_checkout_kernels))

_EXPORTS = {
    "FusedDePTEmbedding": "modules", "FusedPrefixEncoder": "modules", "PrefixTuning": "modules",
    "DePTEmbeddingFunction": "ops", "dept_embedding": "ops", "dept_embedding_reference": "ops",
    "apply_dept": "hf", "load_dept": "hf", "apply_prefix_tuning": "hf", "load_prefix_tuning": "hf",
    "serving": "hf", "set_adapter": "hf", "active_adapter": "hf", "param_groups": "optim", "budget": "budget", "trainable_parameters": "summary",
    "enable_activation_checkpointing": "compat", "unfreeze_adapters": "hf",
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
