"""Prefix-Tuning's MLP tail (tanh -> Linear -> attention layout) as an autograd Function over the
fused Triton kernels in ``kernels/prefix_kv.py`` (see there for the math and the gradient)."""
import torch

from .backend import TRITON_AVAILABLE, use_kernels
from .reference import prefix_kv_reference

if TRITON_AVAILABLE:
    from . import kernels

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PrefixKVFunction(torch.autograd.Function):
    """``tanh(hidden) @ weight.T + bias`` written as (layers, 2, kv_heads, p, head_dim) in one launch;
    backward: dW and db in one launch, dH in one more (plus a sum over N-splits on the GPU)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, num_layers, num_kv_heads, head_dim):
        out = kernels.prefix_kv_forward(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
        ctx.save_for_backward(hidden, weight)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = kernels.prefix_kv_backward(grad_out, hidden, weight, ctx.bias_dtype)
        need = ctx.needs_input_grad
        return (grad_hidden if need[0] else None, grad_weight if need[1] else None,
                grad_bias if need[2] else None, None, None, None)


def check_prefix_kv_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                           num_kv_heads: int, head_dim: int) -> None:
    """Raise TypeError/ValueError naming what is wrong with the inputs of :func:`prefix_kv_projection`."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != dims or 0 in t.shape:
            raise ValueError(f"{name} must be a non-empty {dims}-D tensor, got shape {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    n_out = num_layers * 2 * num_kv_heads * head_dim
    if tuple(weight.shape) != (n_out, hidden.shape[1]):
        raise ValueError(f"weight must have shape (layers * 2 * kv_heads * head_dim, mid) = ({n_out}, "
                         f"{hidden.shape[1]}), got {tuple(weight.shape)}")
    if bias.shape[0] != n_out:
        raise ValueError(f"bias must have {n_out} elements (layers * 2 * kv_heads * head_dim), got {bias.shape[0]}")


def prefix_kv_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                         num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Every layer's prefix keys and values from the prefix MLP's hidden layer, in attention layout.

    Args:
        hidden: (p, mid) pre-activation of the MLP's hidden layer (the first Linear's output).
        weight: (N, mid) and bias: (N,), the second Linear, N = num_layers * 2 * num_kv_heads * head_dim.
        num_layers, num_kv_heads, head_dim: the layout of N (PEFT's ``prompt_embeddings`` column order).

    Returns:
        (num_layers, 2, num_kv_heads, p, head_dim) in ``weight.dtype``; ``[l, 0]`` is layer l's keys,
        ``[l, 1]`` its values. Fused Triton kernels where they run (CUDA, or CPU under
        ``TRITON_INTERPRET=1``), else :func:`dept_fast.reference.prefix_kv_reference`.
    """
    check_prefix_kv_inputs(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
    if not use_kernels(weight):
        return prefix_kv_reference(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
    return PrefixKVFunction.apply(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
