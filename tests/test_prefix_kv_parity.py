"""Fused prefix-K/V kernels (tanh -> Linear -> attention layout) vs the eager reference: forward
and every gradient (dH, dW, db).

Without a GPU the Triton kernels run on CPU through the interpreter (conftest.py). Inputs are
fresh random draws, kernel outputs start poisoned (NaN), and the reference is evaluated in fp32 on
the same (rounded) inputs, so each comparison isolates the kernel's own error: fp32 reduction
order (fp32) or one rounding at the store (16-bit; the interpreter truncates to bf16, still within
one ulp); tolerances in tests/numerics.py. All sizes are small and odd: the interpreter costs ~1 ms
per program instance.
"""
import pytest
import torch

from dept_fast.kernels import PrefixKVBlocks, prefix_kv_backward, prefix_kv_forward
from dept_fast.ops import prefix_kv_projection
from numerics import TOL, rel_err
from prefix_kv_inputs import make_inputs, reference_fp32

# (num_layers, num_kv_heads, head_dim, prefix_len p, mid): N = layers * 2 * kv_heads * head_dim.
SHAPES = {
    "odd-dims": (3, 2, 10, 5, 24),
    "p1,one-layer,one-head": (1, 1, 7, 1, 9),
    "gqa-like,p17,mid40": (2, 3, 12, 17, 40),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_grads_match_reference(shape, dtype, device, poison):
    hidden, weight, bias = (t.requires_grad_() for t in make_inputs(shape, dtype, device))
    out = prefix_kv_projection(hidden, weight, bias, *shape[:3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad_out)
    ref_out, ref_grads = reference_fp32(hidden, weight, bias, shape, grad_out)

    layers, kv_heads, head_dim, p, _ = shape
    assert out.shape == (layers, 2, kv_heads, p, head_dim) and out.dtype == dtype
    assert rel_err(out, ref_out) <= TOL[dtype]
    for name, t, ref in zip(("dH", "dW", "db"), (hidden, weight, bias), ref_grads):
        assert t.grad.dtype == dtype, name
        assert rel_err(t.grad, ref) <= TOL[dtype], name


def test_layout_is_pefts_column_order(device):
    """out[l, c, h, j, e] = Y[j, ((l * 2 + c) * kv_heads + h) * head_dim + e]: layer l's keys are
    PEFT's row 2l of prompt_embeddings viewed (p, 2 * layers, kv_heads, head_dim), values 2l + 1."""
    shape = SHAPES["odd-dims"]
    hidden, weight, bias = make_inputs(shape, torch.float32, device)
    out = prefix_kv_projection(hidden, weight, bias, *shape[:3])
    y = (torch.tanh(hidden) @ weight.T + bias).view(shape[3], 2 * shape[0], shape[1], shape[2])
    assert rel_err(out[1, 0], y[:, 2].transpose(0, 1)) <= TOL[torch.float32]
    assert rel_err(out[2, 1], y[:, 5].transpose(0, 1)) <= TOL[torch.float32]


@pytest.mark.parametrize("blocks", [PrefixKVBlocks(16, 16, 16, splits=3), PrefixKVBlocks(16, 32, 16, splits=2)],
                         ids=["3-p-blocks,3-k-blocks,3-splits", "2-splits,uneven-n"])
def test_tilings_and_n_splits(blocks, device, poison):
    """Several p, mid and N tiles and an uneven split of the hidden gradient's N reduction sum to
    the reference (the launcher adds the fp32 partials)."""
    shape = (2, 3, 7, 37, 40)  # N = 84: not a multiple of any tile
    hidden, weight, bias = make_inputs(shape, torch.float32, device)
    out = prefix_kv_forward(hidden, weight, bias, *shape[:3], blocks=blocks)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = prefix_kv_backward(grad_out, hidden, weight, torch.float32, blocks=blocks)
    ref_out, ref_grads = reference_fp32(hidden, weight, bias, shape, grad_out)
    assert rel_err(out, ref_out) <= TOL[torch.float32]
    for name, got, ref in zip(("dH", "dW", "db"), grads, ref_grads):
        assert rel_err(got, ref) <= TOL[torch.float32], name


def test_fp32_params_beside_bf16_hidden(device, poison):
    """A bf16 hidden layer with fp32 second Linear: fp32 output, each gradient in its input's dtype."""
    shape = SHAPES["odd-dims"]
    hidden, weight, bias = make_inputs(shape, torch.float32, device)
    hidden = hidden.bfloat16().requires_grad_()
    weight.requires_grad_(), bias.requires_grad_()
    out = prefix_kv_projection(hidden, weight, bias, *shape[:3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out.backward(grad_out)
    ref_out, ref_grads = reference_fp32(hidden, weight, bias, shape, grad_out)
    assert out.dtype == torch.float32 and rel_err(out, ref_out) <= TOL[torch.float32]
    assert hidden.grad.dtype == torch.bfloat16 and rel_err(hidden.grad, ref_grads[0]) <= TOL[torch.bfloat16]
    assert rel_err(weight.grad, ref_grads[1]) <= TOL[torch.float32]


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.zeros(119, 24)), r"weight must have shape \(layers \* 2 \* kv_heads \* head_dim, mid\)"),
    (dict(bias=torch.zeros(7)), "bias must have 120 elements"),
    (dict(hidden=torch.zeros(5, 24, dtype=torch.int64)), "hidden must be float32, float16 or bfloat16"),
    (dict(hidden=torch.zeros(0, 24)), "hidden must be non-empty"),
    (dict(num_layers=0), "num_layers must be a positive int"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(hidden=torch.zeros(5, 24), weight=torch.zeros(120, 24), bias=torch.zeros(120), num_layers=3,
                num_kv_heads=2, head_dim=10)
    with pytest.raises((TypeError, ValueError), match=message):
        prefix_kv_projection(**{**args, **bad})
