"""Fused DePT kernels with an adapter per row (mixed-task batches) vs every row run alone with its adapter.

The reference runs each row through the eager single-adapter stage in fp32 (its prompt left-padded
with zero rows to the longest, M), on the same rounded inputs; the fused op runs the whole batch in one
launch forward and one backward. Adapters differ in m, r (r = 0 included), max_length and lora_alpha;
each row's adapter is drawn at random, -1 (no adapter) included; E's rows are multiplied by the model's
embedding multiplier c (``embed_scale``, one for all adapters), 1 or not. Outputs start poisoned (NaN).
Without a GPU the kernels run under the Triton interpreter (conftest.py); tolerances are in
tests/numerics.py.
"""
import pytest
import torch
import torch.nn.functional as F

from dept_fast.kernels import TileConfig, dept_backward, dept_forward, sort_rows, tiling
from dept_fast.ops import dept_embedding_mixed, dept_embedding_reference, pack_adapters
from dept_inputs import EMBED_SCALE
from numerics import TOL, rel_err

EMBED_SCALES = pytest.mark.parametrize("embed_scale", [1.0, EMBED_SCALE], ids=["c=1", "c=sqrt40"])

# (batch, L, vocab V, d, adapters as (m, r, max_length s, lora_alpha), rows forced to -1)
SHAPES = {
    "odd-d,L<s,m0,r0": (5, 7, 50, 40, [(3, 4, 16, 8.0), (5, 0, 12, 8.0), (0, 2, 9, 3.0)], [2]),
    "r30,two-t-blocks": (4, 20, 80, 48, [(7, 30, 30, 8.0), (2, 5, 24, 4.0)], [0]),
    "batch1": (1, 5, 30, 24, [(2, 3, 8, 8.0), (4, 1, 6, 2.0)], []),
    "k1-with-index": (3, 6, 20, 17, [(3, 2, 8, 5.0)], [1]),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_batch(shape, dtype, device, seed=0, param_dtype=None):
    """ids, each row's adapter (-1: none), E, the adapters' [prompt, lora_A, lora_B] leaves and scalings."""
    batch, seq_len, vocab, dim, sizes, no_adapter = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device, param_dtype or dtype).requires_grad_()

    index = torch.randint(-1, len(sizes), (batch,), generator=gen)
    index[no_adapter] = -1
    adapters = [[rand(m, dim), rand(s, r), rand(r, dim)] for m, r, s, _ in sizes]
    scalings = [alpha / r ** 0.5 if r else 0.0 for _, r, _, alpha in sizes]
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    weight = torch.randn(vocab, dim, generator=gen).to(device, dtype)
    return ids, index.to(device), weight, adapters, scalings


def mixed(ids, index, weight, adapters, scalings, **kwargs):
    return dept_embedding_mixed(ids, index, weight, *(list(t) for t in zip(*adapters)), scalings, **kwargs)


def stage_rows_alone(ids, index, weight, adapters, scalings, padding_idx=None, embed_scale=1.0):
    """Each row through the eager single-adapter stage with its adapter (none for -1), its prompt
    left-padded with zero rows to the longest, M."""
    longest = max(a[0].shape[0] for a in adapters)
    rows = []
    for i, a in enumerate(index.tolist()):
        prompt, lora_A, lora_B = adapters[a] if a >= 0 else (weight[:0], weight.new_zeros(ids.shape[1], 0),
                                                             weight.new_zeros(0, weight.shape[1]))
        row = dept_embedding_reference(ids[i:i + 1], weight, prompt, lora_A, lora_B, scalings[a] if a >= 0 else 0.0,
                                       padding_idx, embed_scale=embed_scale)
        rows.append(F.pad(row, (0, 0, longest - prompt.shape[0], 0)))
    return torch.cat(rows)


def rows_alone(ids, index, weight, adapters, scalings, grad_out, padding_idx=None, embed_scale=1.0):
    """:func:`stage_rows_alone` in fp32 on the same (rounded) inputs: the output and the gradients of E
    and of every adapter tensor given ``grad_out``."""
    weight = weight.detach().float().requires_grad_()
    leaves = [[t.detach().float().requires_grad_() for t in adapter] for adapter in adapters]
    out = stage_rows_alone(ids, index, weight, leaves, scalings, padding_idx, embed_scale)
    out.backward(grad_out.float())
    return out.detach(), weight.grad, [[grad_or_zero(t) for t in adapter] for adapter in leaves]


def grad_or_zero(t):
    """A leaf's gradient; zeros where nothing reached it (r = 0: the reference never touches A, B)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


@EMBED_SCALES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_each_row_and_every_gradient_match_the_row_alone(shape, dtype, embed_scale, device, poison):
    ids, index, weight, adapters, scalings = make_batch(shape, dtype, device)
    out = mixed(ids, index, weight, adapters, scalings, embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad_out)
    ref_out, _, ref_grads = rows_alone(ids, index, weight, adapters, scalings, grad_out, embed_scale=embed_scale)

    assert out.dtype == dtype and rel_err(out, ref_out) <= TOL[dtype]
    for a, (adapter, want) in enumerate(zip(adapters, ref_grads)):
        for name, t, w in zip(("prompt", "lora_A", "lora_B"), adapter, want):
            assert t.grad is not None and t.grad.dtype == dtype, (a, name)
            assert rel_err(t.grad, w) <= TOL[dtype], (a, name)


@EMBED_SCALES
def test_fp32_adapters_beside_bf16_embeddings(embed_scale, device, poison):
    """Mixed precision: bf16 E, fp32 prompts/A/B -> bf16 output, fp32 gradients."""
    ids, index, weight, adapters, scalings = make_batch(SHAPES["odd-d,L<s,m0,r0"], torch.bfloat16, device,
                                                        param_dtype=torch.float32)
    out = mixed(ids, index, weight, adapters, scalings, embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    out.backward(grad_out)
    ref_out, _, ref_grads = rows_alone(ids, index, weight, adapters, scalings, grad_out, embed_scale=embed_scale)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref_out) <= TOL[torch.bfloat16]
    for adapter, want in zip(adapters, ref_grads):
        for t, w in zip(adapter, want):
            assert t.grad.dtype == torch.float32 and rel_err(t.grad, w) <= TOL[torch.float32]


@EMBED_SCALES
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-scatter", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_embedding_grad_when_unfrozen(dtype, deterministic, embed_scale, device, poison):
    """dE: c times a scatter over repeated ids (a 9-word vocabulary forces collisions) from rows of every
    adapter and of none; the padding_idx row gets no gradient."""
    shape = (6, 12, 9, 24, [(3, 4, 16, 8.0), (1, 2, 12, 2.0)], [4])
    ids, index, weight, adapters, scalings = make_batch(shape, dtype, device, seed=3)
    ids[0, :3] = 0  # the padding id appears
    weight.requires_grad_()
    out = mixed(ids, index, weight, adapters, scalings, deterministic=deterministic, padding_idx=0,
                embed_scale=embed_scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out.backward(grad_out)
    _, ref_emb, ref_grads = rows_alone(ids, index, weight, adapters, scalings, grad_out, padding_idx=0,
                                       embed_scale=embed_scale)
    assert weight.grad.dtype == dtype and torch.all(weight.grad[0] == 0)
    assert rel_err(weight.grad, ref_emb) <= TOL[dtype]
    for adapter, want in zip(adapters, ref_grads):
        for t, w in zip(adapter, want):
            assert rel_err(t.grad, w) <= TOL[dtype]


def launch_packed(ids, index, weight, adapters, scalings, grad_out, tiles, embed_scale=1.0):
    """The launchers on packed adapters (as dept_embedding_mixed packs them: -1 rows take a trailing
    all-zero adapter): output and (dE, dP, dA, dB) of the packs."""
    packed = pack_adapters(*(list(t) for t in zip(*adapters)), scalings)
    packs = [F.pad(t.detach(), (0, 0) * (t.dim() - 1) + (0, 1)) for t in (packed.prompts, packed.lora_A,
                                                                         packed.lora_B, packed.scaling)]
    rows = sort_rows(torch.where(index < 0, len(adapters), index), len(adapters) + 1)
    out = dept_forward(ids, weight, *packs, rows, tiles=tiles, embed_scale=embed_scale)
    if grad_out is None:
        return out, None
    grads = dept_backward(grad_out, ids, weight.shape[0], packs[1], packs[2], packs[3], packs[0].shape[1],
                          packs[0].dtype, emb_dtype=weight.dtype, rows=rows, tiles=tiles, embed_scale=embed_scale)
    return out, grads


@EMBED_SCALES
@pytest.mark.parametrize("tiles", [TileConfig(block_t=16, block_d=16, groups=2),
                                   TileConfig(block_t=16, block_d=32, groups=3)],
                         ids=["3-d-blocks,2-groups", "2-d-blocks,3-groups"])
def test_each_adapters_rows_split_into_groups(tiles, embed_scale, device, poison):
    """Every adapter's run of rows split into groups (runs of 0 to 4 rows over 2 or 3 groups, so some
    segments are empty), feature blocks and a prompt tile beside input tiles give the rows-alone
    numbers; the backward sums each adapter's per-group partials."""
    shape = (9, 21, 40, 40, [(7, 6, 24, 8.0), (2, 3, 21, 2.0), (4, 0, 30, 8.0)], [3, 7])
    ids, index, weight, adapters, scalings = make_batch(shape, torch.float32, device, seed=5)
    grad_out = torch.randn(9, 7 + 21, 40, generator=torch.Generator().manual_seed(2)).to(device)
    out, (grad_emb, grad_prompt, grad_A, grad_B) = launch_packed(ids, index, weight, adapters, scalings, grad_out,
                                                                 tiles, embed_scale)
    ref_out, ref_emb, ref_grads = rows_alone(ids, index, weight, adapters, scalings, grad_out,
                                             embed_scale=embed_scale)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(grad_emb, ref_emb) <= TOL[torch.float32]
    for a, (prompt_grad, a_grad, b_grad) in enumerate(ref_grads):
        m, (s, r) = prompt_grad.shape[0], a_grad.shape
        assert rel_err(grad_prompt[a, 7 - m:], prompt_grad) <= TOL[torch.float32]
        assert rel_err(grad_A[a, :s, :r], a_grad) <= TOL[torch.float32]
        assert rel_err(grad_B[a, :r], b_grad) <= TOL[torch.float32]


def test_each_adapter_sums_its_own_rows_in_order(device, poison):
    """dP of each adapter is the fp32 sum of its rows' G, added in row order (bit for bit), and nothing
    from another adapter's rows; the no-adapter pack collects the -1 rows."""
    shape = (7, 4, 30, 40, [(5, 2, 8, 8.0), (5, 3, 8, 8.0)], [1, 4])
    ids, index, weight, adapters, scalings = make_batch(shape, torch.float32, device, seed=6)
    grad_out = torch.randn(7, 9, 40, generator=torch.Generator().manual_seed(7)).to(device)
    _, (_, grad_prompt, _, _) = launch_packed(ids, index, weight, adapters, scalings, grad_out,
                                              TileConfig(block_t=16, block_d=64, groups=1))
    for a in (0, 1, -1):
        rows = (index == a).nonzero().flatten().tolist()
        expected = torch.zeros(5, 40, device=device)
        for i in rows:
            expected = expected + grad_out[i, :5]
        assert torch.equal(grad_prompt[a], expected), a


def test_gradients_bitwise_reproducible(device):
    """dP, dA, dB of every adapter never go through atomics; dE does not with deterministic=True."""
    runs = []
    for _ in range(2):
        ids, index, weight, adapters, scalings = make_batch(SHAPES["odd-d,L<s,m0,r0"], torch.float32, device)
        weight.requires_grad_()
        out = mixed(ids, index, weight, adapters, scalings, deterministic=True)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device))
        runs.append([weight.grad] + [t.grad for adapter in adapters for t in adapter])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_one_launch_forward_and_one_backward_for_the_batch(device, monkeypatch):
    launched = []
    real = tiling.launch
    monkeypatch.setattr(tiling, "launch", lambda kernel, *a: launched.append(kernel.__name__) or real(kernel, *a))
    ids, index, weight, adapters, scalings = make_batch(SHAPES["odd-d,L<s,m0,r0"], torch.float32, device)
    out = mixed(ids, index, weight, adapters, scalings)
    assert launched == ["_dept_fwd_kernel"]
    out.sum().backward()
    assert launched == ["_dept_fwd_kernel", "_dept_bwd_kernel"]


def test_double_backward_matches_the_rows_alone(device):
    """create_graph=True with packed adapters: first-order gradients through differentiable ops (equal to
    the kernels'), and gradients of a function of them equal those of the rows run alone (the
    single-adapter op's own second-order tests are in test_double_backward.py), here with c != 1."""
    ids, index, weight, adapters, scalings = make_batch(SHAPES["odd-d,L<s,m0,r0"], torch.float32, device, seed=9)
    leaves = [t for adapter in adapters for t in adapter]

    def gradients(run, create_graph):
        """First-order gradients of <out, G> and (create_graph) those of their squared norm."""
        out = run()
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device)
        first = torch.autograd.grad((out * grad_out).sum(), leaves, create_graph=create_graph, allow_unused=True)
        first = [g if g is not None else torch.zeros_like(t) for g, t in zip(first, leaves)]
        if not create_graph:
            return first, None
        sum((g ** 2).sum() for g in first).backward()
        second = [grad_or_zero(t) for t in leaves]
        for t in leaves:
            t.grad = None
        return [g.detach() for g in first], second

    def fused():
        return mixed(ids, index, weight, adapters, scalings, embed_scale=EMBED_SCALE)

    first_kernels, _ = gradients(fused, create_graph=False)
    first, second = gradients(fused, create_graph=True)
    want_first, want_second = gradients(
        lambda: stage_rows_alone(ids, index, weight, adapters, scalings, embed_scale=EMBED_SCALE), True)
    for got, kernel, want in zip(first, first_kernels, want_first):
        assert rel_err(got, want) <= TOL[torch.float32] and rel_err(kernel, want) <= TOL[torch.float32]
    for got, want in zip(second, want_second):
        assert rel_err(got, want) <= TOL[torch.float32]
    assert any(g.abs().sum() > 0 for g in second)


GPU_SHAPES = {  # the benchmark's mixed batch, adapters of three sizes; 2 adapters whose rows the forward splits
    "b32-d2048-k16": (32, 256, 32000, 2048, [(m, r, s, 8.0) for m, r, s in zip([60, 0, 20] * 6, [30, 8, 0] * 6,
                                                                              [256, 300, 260] * 6)][:16], [5]),
    "b64-d768-k2,split": (64, 200, 32128, 768, [(60, 30, 256, 8.0), (10, 4, 200, 2.0)], [0, 1]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_bf16_mixed_batches_on_the_gpu_plans(shape, poison):
    """bf16 on the GPU's plans (tf32 update tiles, pipelined backward; in the second shape the forward
    splits each adapter's rows into 4 groups): every row's output and gradients as alone; dP/dA/dB
    (and dE with deterministic=True) the same bits on a second run."""
    cuda = torch.device("cuda")
    runs = []
    for _ in range(2):
        ids, index, weight, adapters, scalings = make_batch(shape, torch.bfloat16, cuda)
        weight.requires_grad_()
        out = mixed(ids, index, weight, adapters, scalings, deterministic=True)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(cuda, torch.bfloat16)
        out.backward(grad_out)
        runs.append([weight.grad] + [t.grad for adapter in adapters for t in adapter])
    ref_out, ref_emb, ref_grads = rows_alone(ids, index, weight, adapters, scalings, grad_out)
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16] and rel_err(weight.grad, ref_emb) <= TOL[torch.bfloat16]
    for adapter, want in zip(adapters, ref_grads):
        for t, w in zip(adapter, want):
            assert rel_err(t.grad, w) <= TOL[torch.bfloat16]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
