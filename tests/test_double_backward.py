"""Second-order gradients through the kernel-path autograd Functions (``create_graph=True``):
DePTEmbeddingFunction and PrefixKVFunction against their PyTorch references, torch.autograd's
gradgradcheck, and the DePT model path (a gradient penalty) against the eager composition.

Under ``create_graph=True`` both Functions compute their backward with differentiable PyTorch ops
(the kernels' math); without it, the kernels. So the first-order gradients of both backwards must
agree too. The ops accept fp32/fp16/bf16 only: gradgradcheck runs in fp32 with a step (1e-2) and
tolerances that fp32 finite differences allow (the functions are polynomial, or tanh, in their
inputs: round-off ~1e-7 / 1e-2 relative, asserted at 2e-3), still far below a missing term (the
old failure: second-order prompt gradients None, A/B ones off by 100x). The references are
evaluated in fp64.
"""

import pytest
import torch

import dept_fast.modules.dept_embedding as dept_embedding_module
from dept_fast import dept_embedding, dept_embedding_reference
from dept_fast.ops import dept_embedding_op, prefix_kv_op, prefix_kv_projection, prefix_kv_reference
from dept_inputs import EMBED_SCALE, make_inputs
from dept_models import FAMILY_ROUTES, M, dept_model, padded_batch
from families import build
from numerics import TOL, rel_err
from prefix_kv_inputs import make_inputs as make_prefix_inputs
from tiny_models import VOCAB

# DePT (batch, L, max_length s, vocab V, d, prompt m, rank r) and prefix K/V (layers, kv_heads,
# head_dim, p, mid): tiny, odd, L < s, repeated ids (V 7).
DEPT_SHAPE = (2, 3, 5, 7, 6, 2, 3)
PREFIX_SHAPE = (2, 1, 3, 2, 5)
DEPT_GRADCHECK_SHAPE = (2, 2, 3, 5, 4, 1, 2)  # gradgradcheck perturbs every element of every input
GRADCHECK = dict(eps=1e-2, atol=2e-3, rtol=2e-3)
EMBED_SCALES = pytest.mark.parametrize("embed_scale", [1.0, EMBED_SCALE], ids=["c=1", "c=sqrt40"])
"""The model's embedding multiplier c (out = [P ; c E[ids] + s (A B)[:L]]): 1, and one that is not."""
FP32_GRADCHECK = pytest.mark.filterwarnings("ignore:Input #.* is not a double precision:UserWarning")
"""The ops have no fp64 kernel: gradcheck runs in fp32 at the step and tolerances above."""


def count_calls(monkeypatch, module, name):
    """Calls of ``module.name`` from now on (a list that grows by one per call)."""
    calls, function = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or function(*a, **k))
    return calls


def second_order(outputs_of, leaves, seed=0):
    """First-order gradients (with a graph) of a nonlinear loss of ``outputs_of(*leaves)`` and the
    gradients of a function of those (their squares and a random projection) w.r.t. every leaf."""
    out = outputs_of(*leaves)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=gen).to(out.dtype)
    loss = (torch.sin(out) * weight).sum()  # a nonzero Hessian w.r.t. the output
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    projection = [torch.randn(g.shape, generator=gen).to(g.dtype) for g in first]
    penalty = sum((g * g).sum() + (g * v).sum() for g, v in zip(first, projection))
    return first, torch.autograd.grad(penalty, leaves, allow_unused=True)


def dept_leaves(dtype, shape=DEPT_SHAPE):
    inp = make_inputs(shape, torch.float32, "cpu")
    inp["ids"][0, :2] = 0  # the padding id of the padding_idx case appears
    return inp, [inp[k].to(dtype).requires_grad_() for k in ("weight", "prompt", "lora_A", "lora_B")]


@EMBED_SCALES
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["no-padding-idx", "padding-idx-0"])
def test_dept_second_order_matches_reference(padding_idx, embed_scale, monkeypatch):
    """E, P, A and B all trainable: each second-order gradient against the fp64 reference."""
    calls = count_calls(monkeypatch, dept_embedding_op, "_differentiable_backward")
    inp, leaves = dept_leaves(torch.float32)
    ids, scaling = inp["ids"], inp["scaling"]
    first, got = second_order(
        lambda *t: dept_embedding(ids, *t, scaling, padding_idx=padding_idx, embed_scale=embed_scale), leaves)
    assert calls, "the kernel-path Function did not run its differentiable backward"
    _, ref_leaves = dept_leaves(torch.float64)
    want_first, want = second_order(
        lambda *t: dept_embedding_reference(ids, *t, scaling, padding_idx, embed_scale=embed_scale), ref_leaves)
    for name, g, w, g1, w1 in zip(("weight", "prompt", "lora_A", "lora_B"), got, want, first, want_first):
        assert rel_err(g1, w1) <= TOL[torch.float32], name
        assert g is not None and w.abs().sum() > 0, name
        assert rel_err(g, w) <= TOL[torch.float32], name
    if padding_idx is not None:
        assert torch.all(first[0][padding_idx] == 0) and torch.all(got[0][padding_idx] == 0)


@EMBED_SCALES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dept_backward_with_a_graph_equals_the_kernels(dtype, embed_scale):
    """create_graph=True (PyTorch) and plain backward (kernels): the same gradients and dtypes, here
    with low-precision E beside fp32 P, A, B."""
    inp = make_inputs(DEPT_SHAPE, dtype, "cpu", param_dtype=torch.float32)
    leaves = [inp["weight"].requires_grad_()] + [inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")]
    out = dept_embedding(inp["ids"], *leaves, inp["scaling"], embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    kernels = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    graph = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
    for name, k, g, leaf in zip(("weight", "prompt", "lora_A", "lora_B"), kernels, graph, leaves):
        assert k.dtype == g.dtype == leaf.dtype, name
        assert rel_err(g, k) <= TOL[leaf.dtype], name


@FP32_GRADCHECK
@EMBED_SCALES
def test_dept_gradcheck_and_gradgradcheck(embed_scale):
    """Without padding_idx: with it the output depends on E's padding row, which by definition (as in
    nn.Embedding) gets no gradient."""
    inp, leaves = dept_leaves(torch.float32, DEPT_GRADCHECK_SHAPE)

    def fn(*tensors):
        return dept_embedding(inp["ids"], *tensors, inp["scaling"], embed_scale=embed_scale)

    assert torch.autograd.gradcheck(fn, leaves, **GRADCHECK)
    assert torch.autograd.gradgradcheck(fn, leaves, **GRADCHECK)


def prefix_leaves(dtype):
    return [t.to(dtype).requires_grad_() for t in make_prefix_inputs(PREFIX_SHAPE, torch.float32, "cpu")]


def test_prefix_kv_second_order_matches_reference(monkeypatch):
    calls = count_calls(monkeypatch, prefix_kv_op, "_differentiable_backward")
    layout = PREFIX_SHAPE[:3]
    first, got = second_order(lambda *t: prefix_kv_projection(*t, *layout), prefix_leaves(torch.float32))
    assert calls, "the kernel-path Function did not run its differentiable backward"
    want_first, want = second_order(lambda *t: prefix_kv_reference(*t, *layout), prefix_leaves(torch.float64))
    for name, g, w, g1, w1 in zip(("hidden", "weight", "bias"), got, want, first, want_first):
        assert rel_err(g1, w1) <= TOL[torch.float32], name
        assert g is not None and w.abs().sum() > 0, name
        assert rel_err(g, w) <= TOL[torch.float32], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefix_kv_backward_with_a_graph_equals_the_kernels(dtype):
    leaves = prefix_leaves(dtype)
    out = prefix_kv_projection(*leaves, *PREFIX_SHAPE[:3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    kernels = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    graph = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
    for name, k, g in zip(("hidden", "weight", "bias"), kernels, graph):
        assert k.dtype == g.dtype == dtype, name
        assert rel_err(g, k) <= TOL[dtype], name


@FP32_GRADCHECK
def test_prefix_kv_gradcheck_and_gradgradcheck():
    def fn(*tensors):
        return prefix_kv_projection(*tensors, *PREFIX_SHAPE[:3])

    leaves = prefix_leaves(torch.float32)
    assert torch.autograd.gradcheck(fn, leaves, **GRADCHECK)
    assert torch.autograd.gradgradcheck(fn, leaves, **GRADCHECK)


@FAMILY_ROUTES
def test_gradient_penalty_through_a_dept_model(family, share, monkeypatch):
    """A penalty on the adapter's gradients (create_graph=True through the whole model, eager
    attention: CPU sdpa has no double backward): its gradients equal those of the eager composition
    (the base model on reference embeddings, the prompt in every row)."""
    monkeypatch.setattr(dept_embedding_module, "dept_embedding_at_positions",
                        lambda *a, **k: pytest.fail("right padding must take the fused kernel"))
    calls = count_calls(monkeypatch, dept_embedding_op, "_differentiable_backward")
    torch.manual_seed(2)
    model, base = dept_model(family, share=share, attn_implementation="eager"), build(family, attn_implementation="eager")
    ids, mask = padded_batch([5, 4], 5, "right")
    seq2seq = model.config.is_encoder_decoder
    labels = torch.randint(3, VOCAB, (2, 3)) if seq2seq else ids.masked_fill(mask == 0, -100)
    adapter = model.dept
    params = [adapter.prompt, adapter.lora_A, adapter.lora_B]

    def penalty_grads(loss):
        first = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), params, allow_unused=True)

    got = penalty_grads(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert calls, "the kernel-path Function did not run its differentiable backward"
    embeds = dept_embedding_reference(ids, adapter.weight, *params, adapter.scaling)
    full_mask = torch.cat([torch.ones(2, M, dtype=mask.dtype), mask], 1)
    full_labels = labels if seq2seq else torch.cat([torch.full((2, M), -100), labels], 1)
    want = penalty_grads(base(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss)
    for name, g, w in zip(("prompt", "lora_A", "lora_B"), got, want):
        assert g is not None and w.abs().sum() > 0, name
        assert rel_err(g, w) <= 1e-5, name
