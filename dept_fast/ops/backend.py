"""Where an op runs: the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``) or PyTorch.

CUDA tensors always take the kernels. CPU tensors take the kernels only when the Triton
interpreter is switched on (``TRITON_INTERPRET=1``, how CI exercises them without a GPU) and
torch.compile is not tracing (Dynamo cannot trace an interpreted launch); otherwise they take the
op's PyTorch reference (``dept_fast.ops.*_reference``).
"""
import importlib.util
import os

import torch

# Decided once at import: torch.compile traces use_kernels() and must see a plain constant.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether the Triton interpreter is on (read at kernel definition time by Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_kernels(tensor: torch.Tensor) -> bool:
    """Whether ops on ``tensor``'s device run the Triton kernels rather than the reference."""
    if not TRITON_AVAILABLE:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreting() and not torch.compiler.is_compiling()
