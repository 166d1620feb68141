"""Prefix-Tuning's MLP tail (tanh -> Linear -> attention layout) as ops over the fused Triton kernels in
``kernels/prefix_kv.py`` (see there for the math and the gradient): one encoder's, and G encoders' of
one shape in one launch per kernel."""
from typing import Sequence

import torch

from .backend import TRITON_AVAILABLE, use_kernels
from .checks import check_grouped_prefix_kv_inputs, check_prefix_kv_inputs
from .prefix_kv_reference import grouped_prefix_kv_reference, prefix_kv_reference

if TRITON_AVAILABLE:  # at import, not inside the Functions: torch.compile traces those
    from .. import kernels


class PrefixKVFunction(torch.autograd.Function):
    """``tanh(hidden) @ weight.T + bias`` written as (layers, 2, kv_heads, p, head_dim) in one launch;
    backward: dW and db in one launch, dH in one more (plus a sum over N-splits on the GPU).

    Double backward (``create_graph=True``): the backward is then computed with differentiable
    PyTorch ops (the same math), so second-order gradients are exact.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, num_layers, num_kv_heads, head_dim):
        out = kernels.prefix_kv_forward(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
        ctx.save_for_backward(hidden, weight)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_backward(grad_out, hidden, weight, ctx.bias_dtype)
        else:
            grads = kernels.prefix_kv_backward(grad_out, hidden, weight, ctx.bias_dtype)
        need = ctx.needs_input_grad
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)


class GroupedPrefixKVFunction(torch.autograd.Function):
    """G encoders' ``tanh(hidden[g]) @ weights[g].T + biases[g]``, stacked as (G, layers, 2, kv_heads, p,
    head_dim), in one launch; backward: every dW and db in one launch, every dH in one more (plus a sum
    over N-splits on the GPU). Inputs: ``hidden`` (G, p, mid), the layout, then the G weights and the G
    biases. Double backward as :class:`PrefixKVFunction`'s (differentiable PyTorch ops, per group)."""

    @staticmethod
    def forward(ctx, hidden, num_layers, num_kv_heads, head_dim, *params):
        weights, biases = params[:len(params) // 2], params[len(params) // 2:]
        out = kernels.grouped_prefix_kv_forward(hidden, weights, biases, num_layers, num_kv_heads, head_dim)
        ctx.save_for_backward(hidden, *weights)
        ctx.bias_dtype = biases[0].dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, *weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            per_group = [_differentiable_backward(*args, ctx.bias_dtype) for args in zip(grad_out, hidden, weights)]
            grad_hidden, grad_weights, grad_biases = zip(*per_group)
            grad_hidden = torch.stack(grad_hidden)
        else:
            grad_hidden, grad_weights, grad_biases = kernels.grouped_prefix_kv_backward(grad_out, hidden, weights,
                                                                                        ctx.bias_dtype)
            grad_weights, grad_biases = grad_weights.unbind(0), grad_biases.unbind(0)
        grads = (grad_hidden, None, None, None, *grad_weights, *grad_biases)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _differentiable_backward(grad_out, hidden, weight, bias_dtype):
    """(dH, dW, db) by autograd-traceable PyTorch ops in fp32: with Gy the gradient read back from the
    attention layout as (p, N) and T = tanh(H): dW = Gy^T T, db = sum_j Gy[j], dH = (Gy W) * (1 - T^2)."""
    n_prefix = hidden.shape[0]
    grad_y = grad_out.float().permute(3, 0, 1, 2, 4).reshape(n_prefix, -1)
    tanh = torch.tanh(hidden.float())
    grad_hidden = (grad_y @ weight.float()) * (1 - tanh * tanh)
    return grad_hidden.to(hidden.dtype), (grad_y.t() @ tanh).to(weight.dtype), grad_y.sum(0).to(bias_dtype)


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
        ``TRITON_INTERPRET=1``), else :func:`~dept_fast.ops.prefix_kv_reference.prefix_kv_reference`.
    """
    check_prefix_kv_inputs(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
    if not use_kernels(weight):
        return prefix_kv_reference(hidden, weight, bias, num_layers, num_kv_heads, head_dim)
    return PrefixKVFunction.apply(hidden, weight, bias, num_layers, num_kv_heads, head_dim)


def grouped_launch_available(weight: torch.Tensor) -> bool:
    """Whether :func:`grouped_prefix_kv_projection` on tensors like ``weight`` runs one grouped launch: the
    kernels run there (``use_kernels``), torch.compile is not tracing (it cannot trace the table of the
    groups' data pointers) and no CUDA graph is being captured (a replay would copy the table again from
    a host buffer that is reused by then)."""
    if not use_kernels(weight) or torch.compiler.is_compiling():
        return False
    return not (weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def grouped_prefix_kv_projection(hidden: torch.Tensor, weights: Sequence[torch.Tensor],
                                 biases: Sequence[torch.Tensor], num_layers: int, num_kv_heads: int,
                                 head_dim: int) -> torch.Tensor:
    """:func:`prefix_kv_projection` of G encoders of one shape at once: one launch for all their forwards
    (and one per backward kernel), reading each weight and bias where it is (no copy).

    Args:
        hidden: (G, p, mid), each encoder's hidden-layer pre-activation, stacked.
        weights: G tensors (N, mid) of one dtype; biases: G tensors (N,) of one dtype; one device.
        num_layers, num_kv_heads, head_dim: the layout of N, shared by the groups.

    Returns:
        (G, num_layers, 2, num_kv_heads, p, head_dim) in the weights' dtype; ``[g]`` is what
        ``prefix_kv_projection(hidden[g], weights[g], biases[g], ...)`` returns. Where the kernels do not
        run, :func:`~dept_fast.ops.prefix_kv_reference.grouped_prefix_kv_reference`; where they run but
        not grouped (:func:`grouped_launch_available`: torch.compile, CUDA graph capture), one
        :class:`PrefixKVFunction` per group.
    """
    check_grouped_prefix_kv_inputs(hidden, weights, biases, num_layers, num_kv_heads, head_dim)
    if not use_kernels(weights[0]):
        return grouped_prefix_kv_reference(hidden, weights, biases, num_layers, num_kv_heads, head_dim)
    if not grouped_launch_available(weights[0]):
        return torch.stack([PrefixKVFunction.apply(h, w, b, num_layers, num_kv_heads, head_dim)
                            for h, w, b in zip(hidden.unbind(0), weights, biases)])
    return GroupedPrefixKVFunction.apply(hidden, num_layers, num_kv_heads, head_dim, *weights, *biases)
