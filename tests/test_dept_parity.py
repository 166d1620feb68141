"""Fused DePT kernels vs the eager reference: forward and every gradient.

Without a GPU these run the Triton kernels on CPU through the interpreter (conftest.py); with one,
the same tests run the compiled kernels on CUDA. Inputs are fresh random draws, outputs start
poisoned (NaN), and the reference is evaluated in fp32 on the same (rounded) inputs, so each
comparison isolates the kernel's own error; tolerances are in tests/numerics.py.
"""
import pytest
import torch

from dept_fast.ops import DePTEmbeddingFunction, dept_embedding
from dept_fast.kernels import TileConfig, dept_backward, dept_forward
from dept_inputs import make_inputs, reference_fp32
from numerics import TOL, rel_err

# (batch, L, max_length s, vocab V, d, prompt m, rank r): d never a power of two except where noted.
SHAPES = {
    "odd-d,L<s": (3, 11, 16, 50, 40, 7, 5),
    "batch1,m0,L=s,r1": (1, 16, 16, 37, 24, 0, 1),
    "vanilla-PT r0": (2, 9, 20, 64, 33, 7, 0),
    "r30,two-t-blocks": (2, 20, 30, 80, 48, 7, 30),
    "no-prompt,no-update": (2, 5, 8, 19, 17, 0, 0),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_grads_match_reference(shape, dtype, device, poison):
    inp = make_inputs(shape, dtype, device)
    params = {k: inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], inp["weight"], **params, scaling=inp["scaling"])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad_out)
    ref_out, ref_grads = reference_fp32(inp, grad_out)

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) <= TOL[dtype]
    for name, p in params.items():
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert rel_err(p.grad, ref_grads[name]) <= TOL[dtype], name


def test_lora_grad_rows_beyond_length_are_zero(device, poison):
    """dA rows t >= L get exactly zero (no update reached them), even from a poisoned buffer."""
    inp = make_inputs(SHAPES["odd-d,L<s"], torch.float32, device)
    A = inp["lora_A"].requires_grad_()
    dept_embedding(inp["ids"], inp["weight"], inp["prompt"], A, inp["lora_B"], inp["scaling"]).sum().backward()
    L = inp["ids"].shape[1]
    assert torch.all(A.grad[L:] == 0) and A.grad[:L].abs().sum() > 0


@pytest.mark.parametrize("tiles", [TileConfig(block_t=16, block_d=16, groups=2),
                                   TileConfig(block_t=16, block_d=32, groups=3)],
                         ids=["3-d-blocks,2-groups", "2-d-blocks,3-groups"])
def test_tilings_and_batch_groups(tiles, device, poison):
    """Many feature blocks, a prompt tile next to input tiles and uneven batch groups give the
    same result as the reference (the backward sums per-group partials)."""
    shape = (5, 21, 24, 40, 40, 7, 6)
    inp = make_inputs(shape, torch.float32, device)
    out = dept_forward(inp["ids"], inp["weight"], inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"],
                       tiles=tiles)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grad_emb, grad_prompt, grad_A, grad_B = dept_backward(
        grad_out, inp["ids"], shape[3], inp["lora_A"], inp["lora_B"], inp["scaling"], shape[5],
        torch.float32, emb_dtype=torch.float32, tiles=tiles)
    ref_out, ref = reference_fp32(inp, grad_out, emb_grad=True)
    assert rel_err(out, ref_out) <= TOL[torch.float32]
    for got, name in ((grad_emb, "weight"), (grad_prompt, "prompt"), (grad_A, "lora_A"), (grad_B, "lora_B")):
        assert rel_err(got, ref[name]) <= TOL[torch.float32], name


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 9])
def test_backward_adds_batch_rows_once_in_order(batch, device, poison):
    """The backward's batch loop is software-pipelined on the GPU (rows load ahead of the add): batches
    shorter than its depth and not a multiple of it still add every row exactly once, in row order,
    so dP is the row-ordered fp32 sum bit for bit."""
    shape = (batch, 10, 16, 30, 40, 5, 3)
    inp = make_inputs(shape, torch.float32, device)
    grad_out = torch.randn(batch, 15, 40, generator=torch.Generator().manual_seed(5)).to(device)
    _, grad_prompt, _, _ = dept_backward(grad_out, inp["ids"], shape[3], inp["lora_A"], inp["lora_B"],
                                         inp["scaling"], shape[5], torch.float32, emb_dtype=None,
                                         tiles=TileConfig(block_t=16, block_d=64, groups=1))
    expected = grad_out[0, :5].clone()
    for row in grad_out[1:, :5]:
        expected += row
    assert torch.equal(grad_prompt, expected)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-scatter", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_embedding_grad_when_unfrozen(dtype, deterministic, device, poison):
    """dE is a scatter-add over repeated ids (small vocabulary forces collisions); padding_idx
    rows get no gradient, as with nn.Embedding."""
    shape = (4, 12, 16, 9, 24, 3, 4)
    inp = make_inputs(shape, dtype, device)
    inp["ids"][0, :3] = 0  # the padding id appears
    weight = inp["weight"].requires_grad_()
    out = dept_embedding(inp["ids"], weight, inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"],
                         deterministic=deterministic, padding_idx=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out.backward(grad_out)
    _, ref = reference_fp32(inp, grad_out, emb_grad=True, padding_idx=0)
    assert weight.grad.dtype == dtype
    assert torch.all(weight.grad[0] == 0)
    assert rel_err(weight.grad, ref["weight"]) <= TOL[dtype]


def test_fp32_params_beside_low_precision_embeddings(device, poison):
    """Mixed precision: bf16 embeddings, fp32 prompt/A/B -> bf16 output, fp32 gradients."""
    inp = make_inputs(SHAPES["odd-d,L<s"], torch.bfloat16, device, param_dtype=torch.float32)
    params = {k: inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], inp["weight"], **params, scaling=inp["scaling"])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    out.backward(grad_out)
    ref_out, ref = reference_fp32(inp, grad_out)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref_out) <= TOL[torch.bfloat16]
    for name, p in params.items():
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, ref[name]) <= TOL[torch.float32], name


def test_out_of_range_ids_never_read_by_the_kernel(device):
    """Behind the op's checks (the device-side one is asynchronous) the kernel itself never reads a
    bad id: its row is NaN, and the other rows are untouched."""
    inp = make_inputs(SHAPES["odd-d,L<s"], torch.float32, device)
    ids = inp["ids"].clone()
    ids[1, 4], ids[2, 0] = -3, 50  # vocab is 50
    out = DePTEmbeddingFunction.apply(ids, inp["weight"], inp["prompt"], inp["lora_A"], inp["lora_B"],
                                      inp["scaling"], None, False, None)
    m = inp["prompt"].shape[0]
    bad = torch.zeros(out.shape[:2], dtype=torch.bool)
    bad[1, m + 4] = bad[2, m] = True
    assert torch.isnan(out[bad.to(device)]).all()
    ref_out, _ = reference_fp32(inp)
    assert rel_err(out[~bad.to(device)], ref_out[~bad.to(device)]) <= TOL[torch.float32]


def test_empty_batch_and_zero_length(device):
    inp = make_inputs(SHAPES["odd-d,L<s"], torch.float32, device)
    args = (inp["weight"], inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"])
    assert dept_embedding(inp["ids"][:0], *args).shape == (0, 7 + 11, 40)
    out = dept_embedding(inp["ids"][:, :0], *args)
    assert out.shape == (3, 7, 40) and torch.equal(out, inp["prompt"].expand(3, -1, -1))
