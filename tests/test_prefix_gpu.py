"""CUDA-only checks of Prefix-Tuning: the fused prefix-K/V kernels at real sizes in bf16/fp16 (tf32
products, N split over many programs), torch.compile(fullgraph=True), and a bf16 Llama-shaped
model trained with and without gradient checkpointing. Skipped without a GPU; run with
``pytest tests -m gpu`` (or bench/gpu_session.sh) on a CUDA machine."""
import pytest
import torch

from dept_fast import FusedPrefixEncoder, apply_prefix_tuning, enable_activation_checkpointing
from dept_fast.kernels.prefix_kv import plan_prefix_kv_backward
from dept_fast.ops import prefix_kv_projection
from numerics import TOL, rel_err
from prefix_kv_inputs import make_inputs, reference_fp32
from tiny_models import tiny_llama

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# The benchmark's prefix shape (8 layers, 4 of 64-wide key/value heads, p 64, MLP 512) and odd small ones.
SHAPES = {"llama-8L,p64,mid512": (8, 4, 64, 64, 512), "p1,mid9": (1, 1, 7, 1, 9), "p100,mid200": (3, 5, 24, 100, 200)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernels_match_reference(shape, dtype, poison):
    """16-bit weights run tf32 products: only tanh(H) is rounded (to 10 mantissa bits), on top of the
    output's own rounding, so fp16 (whose rounding is as fine as tf32's) gets twice its tolerance."""
    hidden, weight, bias = (t.requires_grad_() for t in make_inputs(shape, dtype, CUDA))
    out = prefix_kv_projection(hidden, weight, bias, *shape[:3])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_grads = reference_fp32(hidden, weight, bias, shape, grad_out)
    tol = 2 * TOL[dtype] if dtype == torch.float16 else TOL[dtype]
    assert rel_err(out, ref_out) <= tol
    for name, t, ref in zip(("dH", "dW", "db"), (hidden, weight, bias), ref_grads):
        assert rel_err(t.grad, ref) <= tol, name


def test_hidden_gradient_is_split_over_n_and_deterministic():
    shape = SHAPES["llama-8L,p64,mid512"]
    sm_count = torch.cuda.get_device_properties(CUDA).multi_processor_count
    _, _, n_per_split = plan_prefix_kv_backward(64, 512, 8 * 2 * 4 * 64, 64, 2, torch.bfloat16, sm_count)
    assert n_per_split < 8 * 2 * 4 * 64
    hidden, weight, bias = (t.requires_grad_() for t in make_inputs(shape, torch.bfloat16, CUDA))
    grad_out = torch.randn(shape[0], 2, shape[1], shape[3], shape[2], device=CUDA, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        hidden.grad = weight.grad = bias.grad = None
        prefix_kv_projection(hidden, weight, bias, *shape[:3]).backward(grad_out)
        grads.append([t.grad.clone() for t in (hidden, weight, bias)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    encoder = FusedPrefixEncoder(64, 8, 4, 64, projection_dim=512, embed_dim=2048, device=CUDA, dtype=torch.bfloat16)
    results = []
    for fn in (encoder, torch.compile(encoder, fullgraph=True)):
        encoder.zero_grad(set_to_none=True)
        out = fn()
        out.float().square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert torch.equal(eager_out, compiled_out)
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert rel_err(compiled, eager) <= TOL[torch.bfloat16]


def test_bf16_model_same_step_with_gradient_checkpointing():
    """bf16 GQA Llama on the GPU, prefix MLP on the fused kernels: checkpointing changes nothing but
    memory (the recomputation runs the same kernels on the same inputs)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_prefix_tuning(tiny_llama().to(CUDA, torch.bfloat16), 8, projection_dim=64).train()
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        ids = torch.randint(3, 97, (4, 33), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.prefix_tuning.named_parameters()}))
    (loss, grads), (loss_gc, grads_gc) = results
    assert torch.equal(loss, loss_gc)
    for name, grad in grads.items():
        assert rel_err(grads_gc[name], grad) <= TOL[torch.bfloat16], name
