"""Fused DePT kernels vs the eager reference: forward and every gradient.

Without a GPU these run the Triton kernels on CPU through the interpreter (conftest.py); with one,
the same tests run the compiled kernels on CUDA. Inputs are fresh random draws, outputs start
poisoned (NaN), and the reference is evaluated in fp32 on the same (rounded) inputs, so each
comparison isolates the kernel's own error; tolerances are in tests/numerics.py. The stage is
``[P ; c E[ids] + s (A B)[:L]]`` with c the model's embedding multiplier (``embed_scale``): 1 and a
c that is not (EMBED_SCALE) throughout.
"""
import pytest
import torch

from dept_fast.ops import (DePTEmbeddingFunction, dept_embedding, dept_embedding_at_positions, dept_embedding_mixed,
                           dept_embedding_reference)
from dept_fast.kernels import TileConfig, dept_backward, dept_forward
from dept_inputs import EMBED_SCALE, make_inputs, reference_fp32
from numerics import INTERPRETER_BF16_ULPS, TOL, rel_err, rounding_excess

EMBED_SCALES = pytest.mark.parametrize("embed_scale", [1.0, EMBED_SCALE], ids=["c=1", "c=sqrt40"])

# (batch, L, max_length s, vocab V, d, prompt m, rank r): d never a power of two except where noted.
SHAPES = {
    "odd-d,L<s": (3, 11, 16, 50, 40, 7, 5),
    "batch1,m0,L=s,r1": (1, 16, 16, 37, 24, 0, 1),
    "vanilla-PT r0": (2, 9, 20, 64, 33, 7, 0),
    "r30,two-t-blocks": (2, 20, 30, 80, 48, 7, 30),
    "no-prompt,no-update": (2, 5, 8, 19, 17, 0, 0),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@EMBED_SCALES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_and_grads_match_reference(shape, dtype, embed_scale, device, poison):
    inp = make_inputs(shape, dtype, device, embed_scale=embed_scale)
    params = {k: inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], inp["weight"], **params, scaling=inp["scaling"], embed_scale=embed_scale)
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


@EMBED_SCALES
@pytest.mark.parametrize("tiles", [TileConfig(block_t=16, block_d=16, groups=2),
                                   TileConfig(block_t=16, block_d=32, groups=3)],
                         ids=["3-d-blocks,2-groups", "2-d-blocks,3-groups"])
def test_tilings_and_batch_groups(tiles, embed_scale, device, poison):
    """Many feature blocks, a prompt tile next to input tiles and uneven batch groups give the
    same result as the reference (the backward sums per-group partials; dE by the atomic scatter)."""
    shape = (5, 21, 24, 40, 40, 7, 6)
    inp = make_inputs(shape, torch.float32, device, embed_scale=embed_scale)
    out = dept_forward(inp["ids"], inp["weight"], inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"],
                       tiles=tiles, embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grad_emb, grad_prompt, grad_A, grad_B = dept_backward(
        grad_out, inp["ids"], shape[3], inp["lora_A"], inp["lora_B"], inp["scaling"], shape[5],
        torch.float32, emb_dtype=torch.float32, tiles=tiles, embed_scale=embed_scale)
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


@EMBED_SCALES
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-scatter", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_embedding_grad_when_unfrozen(dtype, deterministic, embed_scale, device, poison):
    """dE is c times a scatter-add over repeated ids (small vocabulary forces collisions); padding_idx
    rows get no gradient, as with nn.Embedding."""
    shape = (4, 12, 16, 9, 24, 3, 4)
    inp = make_inputs(shape, dtype, device, embed_scale=embed_scale)
    inp["ids"][0, :3] = 0  # the padding id appears
    weight = inp["weight"].requires_grad_()
    out = dept_embedding(inp["ids"], weight, inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"],
                         deterministic=deterministic, padding_idx=0, embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out.backward(grad_out)
    _, ref = reference_fp32(inp, grad_out, emb_grad=True, padding_idx=0)
    assert weight.grad.dtype == dtype
    assert torch.all(weight.grad[0] == 0)
    assert rel_err(weight.grad, ref["weight"]) <= TOL[dtype]


@EMBED_SCALES
def test_fp32_params_beside_low_precision_embeddings(embed_scale, device, poison):
    """Mixed precision: bf16 embeddings, fp32 prompt/A/B -> bf16 output, fp32 gradients."""
    inp = make_inputs(SHAPES["odd-d,L<s"], torch.bfloat16, device, param_dtype=torch.float32, embed_scale=embed_scale)
    params = {k: inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], inp["weight"], **params, scaling=inp["scaling"], embed_scale=embed_scale)
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


FUSED_PATHS = ("fused", "left-padded", "mixed")
"""The paths of test_every_path_rounds_a_row_once_whatever_its_padding that run the fused kernel."""


@EMBED_SCALES
@pytest.mark.parametrize("emb_dtype, param_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-E,bf16-adapter", "bf16-E,fp32-adapter"])
def test_every_path_rounds_a_row_once_whatever_its_padding(emb_dtype, param_dtype, embed_scale, device, poison):
    """One precision rule (fp32 math: c E row + s A.float() B.float(), rounded once to E's dtype; the
    prompt cast to E's dtype) in every path: the fused kernel, the reference (the op's plain-CPU path),
    the per-position path (positions = columns, and a left-padded copy of each row), the packed mixed
    batch and the mixed per-position path. Each token's value is its exact (fp64) value rounded once,
    to within fp32 summation noise: for fp32 E to 2e-5 relative, for bf16 E to half a bf16 ulp plus
    that noise (the old reference computed A B in the adapter's dtype: 1e-3 off with a bf16 adapter
    beside fp32 E, and rounded the update before adding it: up to a full ulp off with bf16 E). Under the
    interpreter the kernels' bf16 cast truncates (numerics.INTERPRETER_BF16_ULPS)."""
    shape = (3, 11, 16, 50, 40, 7, 5)
    inp = make_inputs(shape, emb_dtype, device, param_dtype=param_dtype, embed_scale=embed_scale)
    ids, weight, prompt, A, B, s = (inp[k] for k in ("ids", "weight", "prompt", "lora_A", "lora_B", "scaling"))
    b, L, m, pad = ids.shape[0], ids.shape[1], prompt.shape[0], 3
    columns = torch.arange(L, device=device).expand(b, L)
    # Each row left-padded by 3 (pad id 0, position 0): its real tokens take rows 0 .. L - 4 of A.
    padded_ids = torch.cat([torch.zeros(b, pad, dtype=ids.dtype, device=device), ids[:, :L - pad]], 1)
    padded_positions = (columns - pad).clamp_min(0)
    paths = {
        "fused": dept_embedding(ids, weight, prompt, A, B, s, embed_scale=embed_scale),
        "reference": dept_embedding_reference(ids, weight, prompt, A, B, s, embed_scale=embed_scale),
        "per-position": dept_embedding_at_positions(ids, columns, weight, prompt, A, B, s, embed_scale=embed_scale),
        "left-padded": torch.cat([
            dept_embedding_at_positions(padded_ids, padded_positions, weight, prompt, A, B, s,
                                        embed_scale=embed_scale),
            dept_embedding(ids[:, L - pad:], weight, prompt[:0], A[L - pad:], B, s, embed_scale=embed_scale)], 1),
        "mixed": dept_embedding_mixed(ids, torch.zeros(b, dtype=torch.long, device=device), weight, [prompt], [A],
                                      [B], [s], embed_scale=embed_scale),
        "mixed-per-position": dept_embedding_mixed(ids, torch.zeros(b, dtype=torch.long, device=device), weight,
                                                   [prompt], [A], [B], [s], positions=columns,
                                                   embed_scale=embed_scale),
    }
    # The left-padded rows put their real tokens after the pads; moved back into place, then compared.
    shifted = paths["left-padded"]
    paths["left-padded"] = torch.cat([shifted[:, :m], shifted[:, m + pad:m + L], shifted[:, m + L:]], 1)
    exact_rows = embed_scale * weight.double()[ids] + s * (A.double()[:L] @ B.double())
    exact = torch.cat([prompt.double().expand(b, -1, -1), exact_rows], 1)
    magnitude = torch.cat([prompt.double().abs().expand(b, -1, -1),
                           embed_scale * weight.double().abs()[ids] + s * (A.double().abs()[:L] @ B.double().abs())], 1)
    for name, out in paths.items():
        assert out.dtype == emb_dtype and out.shape == exact.shape, name
        if emb_dtype == torch.float32:
            assert rel_err(out, exact) <= TOL[torch.float32], name
        else:
            ulps = INTERPRETER_BF16_ULPS if name in FUSED_PATHS and device.type == "cpu" else 0.5
            assert rounding_excess(out, exact, magnitude, terms=shape[-1] + 3, ulps=ulps) <= 0, name
