"""Grouped prefix-K/V kernels (G encoders of one shape in one launch per kernel) vs the eager reference,
and :func:`grouped_key_values` vs each encoder's ``key_values()``.

As in test_prefix_kv_parity.py: fresh random inputs (each group its own draw), kernel outputs start
poisoned (NaN), the reference runs in fp32 on the same (rounded) inputs, tolerances from
tests/numerics.py; small odd shapes, the interpreter costs ~1 ms per program instance.
"""
import pytest
import torch

from dept_fast.kernels import PrefixKVBlocks, grouped_prefix_kv_backward, grouped_prefix_kv_forward, tiling
from dept_fast.kernels import prefix_kv as prefix_kv_kernels
from dept_fast.modules import FusedPrefixEncoder, grouped_key_values
from dept_fast.ops import grouped_prefix_kv_projection
from numerics import TOL, rel_err
from prefix_kv_inputs import make_inputs, reference_fp32

# (num_layers, num_kv_heads, head_dim, prefix_len p, mid): head_dim and mid not powers of two, p = 1.
SHAPES = {
    "odd-dims": (3, 2, 10, 5, 24),
    "p1,one-layer,one-head": (1, 1, 7, 1, 9),
    "gqa-like,p17,mid40": (2, 3, 12, 17, 40),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype, device):
    """TOL, and for fp16 on the GPU twice it: 16-bit weights run tf32 products there, which round tanh(H) too
    (to fp16's own precision, on top of the output's rounding; as tests/test_prefix_gpu.py)."""
    return 2 * TOL[dtype] if dtype == torch.float16 and device.type == "cuda" else TOL[dtype]


def group_inputs(shape, dtype, device, groups):
    """(hidden (G, p, mid), weights, biases): group g's tensors are make_inputs' draw with seed g; the
    weights and biases stay separate tensors (the launch must reach each where it is)."""
    draws = [make_inputs(shape, dtype, device, seed=g) for g in range(groups)]
    hidden = torch.stack([d[0] for d in draws]).requires_grad_()
    return hidden, [d[1].requires_grad_() for d in draws], [d[2].requires_grad_() for d in draws]


def assert_groups_match_reference(shape, out, grads, hidden, weights, biases, grad_out, tol):
    """``out`` (G, ...) and the stacked/per-group gradients equal the fp32 reference of each group."""
    for g, (weight, bias) in enumerate(zip(weights, biases)):
        ref_out, ref_grads = reference_fp32(hidden[g], weight, bias, shape, grad_out[g])
        assert rel_err(out[g], ref_out) <= tol, g
        for name, got, ref in zip(("dH", "dW", "db"), (grads[0][g], grads[1][g], grads[2][g]), ref_grads):
            assert rel_err(got, ref) <= tol, (g, name)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_grouped_forward_and_grads_match_reference(shape, dtype, groups, device, poison):
    hidden, weights, biases = group_inputs(shape, dtype, device, groups)
    out = grouped_prefix_kv_projection(hidden, weights, biases, *shape[:3])
    layers, kv_heads, head_dim, p, _ = shape
    assert out.shape == (groups, layers, 2, kv_heads, p, head_dim) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad_out)
    for t in (hidden, *weights, *biases):
        assert t.grad.dtype == dtype
    assert_groups_match_reference(shape, out, (hidden.grad, [w.grad for w in weights], [b.grad for b in biases]),
                                  hidden, weights, biases, grad_out, tol(dtype, device))


def test_groups_read_in_place_at_any_alignment_and_order(device, poison):
    """Weights and biases that are views of one buffer at odd element offsets (so the offsets table's gcd,
    the alignment the kernels may assume, is 1) and lie in memory in the reverse of the group order (negative
    offsets), with several p, mid and N tiles and an uneven split of the hidden gradient's N reduction."""
    shape = (2, 3, 7, 37, 40)  # N = 84: not a multiple of any tile
    n_out, mid, groups = 84, 40, 3
    hidden, weights, biases = group_inputs(shape, torch.float32, device, groups)
    flat = torch.full((groups * (n_out * mid + n_out + 1) + 1,), float("nan"), device=device)
    views, start = [], 1
    for weight, bias in zip(reversed(weights), reversed(biases)):
        w_view = flat[start:start + n_out * mid].view(n_out, mid)
        b_view = flat[start + n_out * mid + 1:start + n_out * mid + 1 + n_out]
        w_view.copy_(weight.detach()), b_view.copy_(bias.detach())
        views.append((w_view, b_view))
        start += n_out * mid + n_out + 1
    w_views, b_views = [v[0] for v in reversed(views)], [v[1] for v in reversed(views)]
    table, align = prefix_kv_kernels._offsets_table([w_views, b_views])
    assert align == 1 and (table[0, 1:] < 0).all()
    blocks = PrefixKVBlocks(16, 16, 16, splits=3)
    hidden = hidden.detach()
    out = grouped_prefix_kv_forward(hidden, w_views, b_views, *shape[:3], blocks=blocks)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = grouped_prefix_kv_backward(grad_out, hidden, w_views, torch.float32, blocks=blocks)
    assert_groups_match_reference(shape, out, grads, hidden, weights, biases, grad_out, TOL[torch.float32])


def test_one_launch_per_kernel_for_all_groups(device, monkeypatch):
    """Three encoders of one shape: one forward launch, one launch per backward kernel, grid axis 1 = 3."""
    launches = []
    real = tiling.launch
    monkeypatch.setattr(tiling, "launch", lambda kernel, plan, *args: (launches.append((kernel, plan.grid)),
                                                                       real(kernel, plan, *args)))
    torch.manual_seed(0)
    encoders = [FusedPrefixEncoder(3, 2, 2, 6, projection_dim=20, embed_dim=11, device=device) for _ in range(3)]
    pairs = grouped_key_values(encoders)
    assert [(k.__name__, grid[1]) for k, grid in launches] == [("_prefix_kv_fwd_kernel", 3)]
    sum((k.sum() + 2 * v.sum()) for layers in pairs for k, v in layers).backward()
    assert [(k.__name__, grid[1]) for k, grid in launches[1:]] == [("_prefix_kv_bwd_weight_kernel", 3),
                                                                  ("_prefix_kv_bwd_hidden_kernel", 3)]


def _encoders(device, dtype=torch.float32):
    """A BART-like set: "encoder", "decoder", "cross" of one shape, one merged, one of another prefix length
    and one alone in its head_dim; embed widths differ (the first Linear runs per encoder)."""
    torch.manual_seed(3)
    make = FusedPrefixEncoder
    return [make(4, 2, 2, 6, projection_dim=20, embed_dim=12, dtype=dtype, device=device),
            make(4, 2, 2, 6, projection_dim=20, embed_dim=9, dtype=dtype, device=device),
            make(3, 2, 2, 6, projection_dim=20, dtype=dtype, device=device),
            make(4, 2, 2, 6, projection_dim=20, dtype=dtype, device=device).merge(),
            make(4, 2, 2, 6, projection_dim=20, embed_dim=7, dtype=dtype, device=device),
            make(4, 2, 2, 5, projection_dim=20, dtype=dtype, device=device),
            make(3, 2, 2, 6, projection_dim=20, dtype=dtype, device=device)]


def _values_and_grads(encoders, key_values):
    """Every key/value of every encoder, and every parameter's gradient of one random loss over them."""
    gen = torch.Generator().manual_seed(5)
    flat = [t for layers in key_values for pair in layers for t in pair]
    loss = sum((t * torch.randn(t.shape, generator=gen).to(t.device, t.dtype)).sum() for t in flat)
    params = [p for e in encoders for p in e.parameters()]
    return [t.detach() for t in flat], torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_key_values_equal_each_encoders_key_values(dtype, device, monkeypatch):
    encoders = _encoders(device, dtype)
    launches = []
    real = tiling.launch
    monkeypatch.setattr(tiling, "launch", lambda kernel, plan, *args: (launches.append(plan.grid[1]),
                                                                       real(kernel, plan, *args)))
    grouped = grouped_key_values(encoders)
    assert sorted(launches) == [1, 2, 3]  # forwards: the lone head_dim 5, the two p 3, the three p 4 unmerged
    launches.clear()
    each = [e.key_values() for e in encoders]
    assert len(grouped) == len(encoders)
    for got, want in zip(grouped, each):
        assert len(got) == len(want)
        for (k, v), (k_want, v_want) in zip(got, want):
            assert k.shape == k_want.shape and v.shape == v_want.shape and k.dtype == dtype
    got_values, got_grads = _values_and_grads(encoders, grouped)
    want_values, want_grads = _values_and_grads(encoders, each)
    for got, want in zip(got_values, want_values):
        assert rel_err(got, want) <= TOL[dtype]
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) <= TOL[dtype]


def test_grouped_key_values_without_kernels_is_the_reference_path(monkeypatch):
    """CPU without the interpreter: every encoder by its own (reference) key_values(), same numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(tiling, "launch", lambda *a: pytest.fail("no kernel may run on CPU without the interpreter"))
    encoders = _encoders(torch.device("cpu"))
    got_values, got_grads = _values_and_grads(encoders, grouped_key_values(encoders))
    want_values, want_grads = _values_and_grads(encoders, [e.key_values() for e in encoders])
    assert all(torch.equal(g, w) for g, w in zip(got_values, want_values))
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


def test_grouped_double_backward_equals_the_kernels(device):
    """create_graph=True takes differentiable PyTorch ops per group: the same gradients as the kernels."""
    shape = SHAPES["odd-dims"]
    hidden, weights, biases = group_inputs(shape, torch.float32, device, 2)
    leaves = [hidden, *weights, *biases]
    out = grouped_prefix_kv_projection(hidden, weights, biases, *shape[:3])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device)
    kernels = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    graph = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
    for k, g in zip(kernels, graph):
        assert rel_err(g, k) <= TOL[torch.float32]
    assert graph[0].requires_grad


@pytest.mark.parametrize("bad, message, error", [
    (dict(weights="w"), "weights and biases must be lists or tuples", TypeError),
    (dict(biases=[torch.zeros(120)]), "hidden has 2 groups but 2 weights and 1 biases", ValueError),
    (dict(weights=[torch.zeros(120, 24), torch.zeros(120, 24, dtype=torch.float16)]),
     "group 1's weight is torch.float16, group 0's torch.float32", TypeError),
    (dict(weights=[torch.zeros(120, 24), torch.zeros(119, 24)]), r"group 1: weight must have shape", ValueError),
    (dict(hidden=torch.zeros(2, 5, 24, dtype=torch.int64)), "hidden must be float32", TypeError),
    (dict(hidden=torch.zeros(5, 24)), "hidden must be 3-D", ValueError),
    (dict(hidden=torch.zeros(0, 5, 24), weights=[], biases=[]), r"hidden must be non-empty \(G >= 1", ValueError),
])
def test_bad_grouped_inputs_are_named(bad, message, error):
    args = dict(hidden=torch.zeros(2, 5, 24), weights=[torch.zeros(120, 24)] * 2, biases=[torch.zeros(120)] * 2,
                num_layers=3, num_kv_heads=2, head_dim=10)
    with pytest.raises(error, match=message):
        grouped_prefix_kv_projection(**{**args, **bad})


def test_grouped_key_values_refuses_other_modules():
    with pytest.raises(TypeError, match=r"encoders\[1\] must be a FusedPrefixEncoder, got Linear"):
        grouped_key_values([FusedPrefixEncoder(2, 1, 1, 4, projection_dim=8), torch.nn.Linear(2, 2)])


def test_without_a_grouped_launch_each_group_runs_alone(device, monkeypatch, poison):
    """Where the kernels run but no grouped launch may (torch.compile, CUDA graph capture), one
    single-encoder launch per group, with the same numbers."""
    from dept_fast.ops import prefix_kv_op

    shape = SHAPES["odd-dims"]
    hidden, weights, biases = group_inputs(shape, torch.float32, device, 3)
    grouped = grouped_prefix_kv_projection(hidden, weights, biases, *shape[:3])
    grad_out = torch.randn(grouped.shape, generator=torch.Generator().manual_seed(6)).to(device)
    want = torch.autograd.grad(grouped, [hidden, *weights, *biases], grad_out)
    grids = []
    real = tiling.launch
    monkeypatch.setattr(tiling, "launch", lambda kernel, plan, *args: (grids.append(plan.grid),
                                                                       real(kernel, plan, *args)))
    monkeypatch.setattr(prefix_kv_op, "grouped_launch_available", lambda weight: False)
    alone = grouped_prefix_kv_projection(hidden, weights, biases, *shape[:3])
    assert [g[1] for g in grids] == [1, 1, 1]
    got = torch.autograd.grad(alone, [hidden, *weights, *biases], grad_out)
    assert rel_err(alone, grouped) <= TOL[torch.float32]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL[torch.float32]
