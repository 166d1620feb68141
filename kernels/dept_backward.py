"""Fused DePT embedding stage, backward: the upstream gradient is read exactly once.

With G = dLoss/dout of shape (b, m + L, d), row i taking adapter a(i) (one adapter: a(i) = 0),
R_a = {i : a(i) = a} the rows of adapter a, and c the forward's ``embed_scale`` (out[i, m + t] =
c E[ids[i, t]] + s_a (A_a B_a)[t]):

    S_a[j]    = sum over i in R_a of G[i, j]          (fp32, every position j < m + L)
    dP_a      = S_a[:m]
    Gs_a      = S_a[m:]                                (the input positions)
    dA_a[:L]  = s_a * Gs_a @ B_a^T,   dA_a[L:] = 0
    dB_a      = s_a * A_a[:L]^T @ Gs_a
    dE[v]     = c * sum over (i, t) with ids[i, t] = v of G[i, m + t]     (only if E requires grad)

(c enters dE alone: dP, dA, dB do not depend on it.)

``_dept_bwd_kernel`` streams G once: each program reduces its (BLOCK_T x BLOCK_D) tile over one
segment of rows, all of one adapter (rows visited sorted by adapter: ``adapter_rows.sort_rows``),
into fp32 registers and stores the partial sum S_a,g (no float atomics); with one adapter the
segments are batch groups, with several each adapter's rows are split into the same number of
groups. When dE is wanted it scatter-adds each G row, times c, into an fp32 dE buffer with relaxed
atomics (no memory fences: nothing reads dE until the kernel ends); c's value is a runtime fp32
argument, its use the constexpr ``EMBED_SCALED`` (c != 1), so c = 1 compiles to the kernel without a
scale (a runtime multiply by 1 cost 6-8 registers on sm_80, fp32 +dE). The row loop is
software-pipelined (``tl.range(num_stages=STAGES)``: rows i + 1 .. i + STAGES - 1 are loading, by
cp.async into shared memory, while row i is added), so every thread keeps 8-12 16-byte loads of G in
flight instead of waiting on each row; the adds still run in row order, so the sums are the same bits
as unpipelined. The partial sums are summed over groups, and the two rank-r products on each S_a are
left to cuBLAS (batched over adapters, fp32). dP, dA and dB are therefore bit-for-bit deterministic; dE is
deterministic only through ``deterministic=True``, which replaces the atomics by PyTorch's
sort-based embedding backward (a second read of G; with c != 1 it reads G in fp32, sums in fp32 and
scales once, so dE is still rounded once to E's dtype).

Memory: the partial sums are k x groups x (m + L) x d fp32. Groups are capped so that this stays
below an eighth of G's bytes where it can (``plan_dept_backward``), but one slab per adapter is the
least: with k packed adapters the sums take k (m + L) d x 4 bytes, as much as G itself (bf16) when
there are b / 2 adapters (e.g. 17 slabs of 316 x 2048 fp32, 44 MB, beside a 41 MB G at b 32).
"""
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import buffers
from . import tiling
from .adapter_rows import AdapterRows, _segment_rows, as_packs, scaling_of_packs
from .tiling import Plan, TileConfig, choose_tiles


# Program (j-block, d-block, segment s = (a, g)), rows i of the segment in visiting order:
#     S_a,g[j, :] = sum_i G[i, j, :]                         (fp32, added in row order: deterministic)
#     dE[ids[i, t], :] += c * G[i, m + t, :]                 (SCATTER_EMB: relaxed fp32 atomics, c = embed_scale)
# dept_backward then forms S_a = sum_g S_a,g, dP_a = S_a[:m], dA_a[:L] = s_a S_a[m:] B_a^T,
# dB_a = s_a A_a[:L]^T S_a[m:] (batched over adapters, fp32).
@triton.jit
def _dept_bwd_kernel(
    grad_ptr, ids_ptr, order_ptr, runs_ptr, colsum_ptr, grad_emb_ptr,
    batch, seq_len, vocab, dim, n_prompt, groups,
    stride_grad_b, stride_grad_t, stride_ids_b, embed_scale,
    INDEXED: tl.constexpr, SCATTER_EMB: tl.constexpr, EMBED_SCALED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)  # segment: one group of adapter a's rows, partial sum S_a,g
    n_pos = n_prompt + seq_len
    row_start, row_end = _segment_rows(runs_ptr, pid_s, groups, batch, INDEXED)

    o_j = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_j = o_j < n_pos
    m_d = o_d < dim
    m_jd = m_j[:, None] & m_d[None, :]
    # Input positions t = j - m (only meaningful where j >= m).
    o_t = o_j - n_prompt
    m_t = m_j & (o_j >= n_prompt)
    o_grad = o_j[:, None] * stride_grad_t + o_d[None, :]

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    # int64 row offsets: b*(m+L)*d may exceed 2**31. Without an adapter index the pointers advance one
    # row per iteration (up to 16 fewer registers than recomputing them from the row, sm_80 and sm_90).
    p_grad = grad_ptr + tl.cast(row_start, tl.int64) * stride_grad_b + o_grad
    p_ids = ids_ptr + tl.cast(row_start, tl.int64) * stride_ids_b + o_t
    for i in tl.range(row_start, row_end, num_stages=STAGES):
        if INDEXED:
            row = tl.load(order_ptr + i)
            p_grad = grad_ptr + row * stride_grad_b + o_grad
            p_ids = ids_ptr + row * stride_ids_b + o_t
        b_g = tl.load(p_grad, mask=m_jd, other=0.0).to(tl.float32)
        acc += b_g
        if SCATTER_EMB:
            b_ids = tl.load(p_ids, mask=m_t, other=-1).to(tl.int64)
            m_ok = m_t & (b_ids >= 0) & (b_ids < vocab)
            b_de = b_g
            if EMBED_SCALED:
                b_de = b_g * embed_scale
            tl.atomic_add(grad_emb_ptr + b_ids[:, None] * dim + o_d[None, :], b_de,
                          mask=m_ok[:, None] & m_d[None, :], sem="relaxed")
        p_grad += stride_grad_b
        p_ids += stride_ids_b
    p_sum = colsum_ptr + pid_s.to(tl.int64) * n_pos * dim + o_j[:, None] * dim + o_d[None, :]
    tl.store(p_sum, acc, mask=m_jd)


def plan_dept_backward(batch: int, n_pos: int, dim: int, element_size: int, scatter: bool,
                       sm_count: Optional[int], adapters: Optional[int] = None,
                       tiles: Optional[TileConfig] = None, embed_scaled: bool = False) -> Plan:
    """Grid and launch arguments of ``_dept_bwd_kernel`` for G of shape (batch, n_pos, dim) on a GPU with
    ``sm_count`` SMs (None: the interpreter); ``adapters``: k packed adapters, one per row (None: one
    adapter); ``tiles`` overrides :func:`tiling.choose_tiles`; ``embed_scaled``: the scattered dE rows are
    multiplied by an ``embed_scale`` other than 1. ``grid[2]`` is k x the groups per adapter;
    the groups are capped at b x element_size / (32 k), so that the fp32 partial sums take at most an
    eighth of G's bytes when that leaves at least one group."""
    runs = adapters or 1
    tiles = tiles or choose_tiles(batch, n_pos, dim, element_size, sm_count, runs=runs,
                                  max_groups=max(1, batch * element_size // (32 * runs)))
    grid = (triton.cdiv(n_pos, tiles.block_t), triton.cdiv(dim, tiles.block_d), runs * tiles.groups)
    return Plan(grid, dict(INDEXED=adapters is not None, SCATTER_EMB=scatter,
                           EMBED_SCALED=scatter and embed_scaled, BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d,
                           STAGES=tiling._BWD_STAGES, num_warps=tiles.num_warps))


def dept_backward(
    grad_out: torch.Tensor, ids: torch.Tensor, vocab: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: Union[float, torch.Tensor], n_prompt: int, prompt_dtype: torch.dtype, emb_dtype: Optional[torch.dtype],
    deterministic: bool = False, rows: Optional[AdapterRows] = None, tiles: TileConfig = None, *,
    embed_scale: float = 1.0,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dE, dP, dA, dB) of the fused DePT stage from ``grad_out`` (b, m + L, d).

    One adapter (``rows`` None: lora_A (s, r), lora_B (r, d), a float ``scaling``) or k packed ones
    (lora_A (k, S, R), lora_B (k, R, d), ``scaling`` (k,) fp32, ``rows`` each row's adapter), as in
    :func:`dept_forward`; ``n_prompt`` is m (M). ``emb_dtype`` None means the embedding is frozen and dE
    is not computed (returned None); ``embed_scale`` is the forward's multiplier of E's rows, which dE
    carries. dP (m, d) or (k, M, d), dA, dB come back in the dtypes of the prompt (``prompt_dtype``),
    lora_A and lora_B, shaped as the adapter tensors.
    """
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    ids = ids.contiguous()
    batch, seq_len = ids.shape
    dim = grad_out.shape[-1]
    n_pos = n_prompt + seq_len
    device = grad_out.device
    indexed = rows is not None
    packed_A, packed_B = as_packs(lora_A, lora_B)
    adapters = packed_A.shape[0]
    scatter = emb_dtype is not None and not deterministic
    grad_emb = torch.zeros((vocab, dim), dtype=torch.float32, device=device) if scatter else None

    plan = plan_dept_backward(batch, n_pos, dim, grad_out.element_size(), scatter, tiling._sm_count(device),
                              adapters if indexed else None, tiles, embed_scaled=embed_scale != 1.0)
    groups = plan.grid[2] // adapters
    colsum = buffers.allocate((adapters, groups, n_pos, dim), torch.float32, device)
    if colsum.numel() and batch:
        tiling.launch(
            _dept_bwd_kernel, plan,
            grad_out, ids, rows.order if indexed else ids, rows.runs if indexed else ids,  # ids: never read
            colsum, grad_emb if scatter else colsum,
            batch, seq_len, vocab, dim, n_prompt, groups,
            grad_out.stride(0), grad_out.stride(1), ids.stride(0), float(embed_scale))
    else:
        colsum.zero_()
    col = colsum[:, 0] if groups == 1 else colsum.sum(1)

    scale = scaling_of_packs(scaling)
    g_in = col[:, n_prompt:]
    grad_A = buffers.allocate(packed_A.shape, lora_A.dtype, device)
    grad_A[:, seq_len:].zero_()
    grad_A[:, :seq_len] = scale * (g_in @ packed_B.transpose(1, 2).float())
    grad_B = (scale * (packed_A[:, :seq_len].transpose(1, 2).float() @ g_in)).to(lora_B.dtype)
    grad_prompt = col[:, :n_prompt].to(prompt_dtype)
    if lora_A.dim() == 2:
        grad_prompt, grad_A, grad_B = grad_prompt[0], grad_A[0], grad_B[0]

    if emb_dtype is None:
        return None, grad_prompt, grad_A, grad_B
    if deterministic:
        grad_in = grad_out[:, n_prompt:]
        if embed_scale != 1.0:  # fp32 sums, scaled once: one rounding to E's dtype, as the atomic path
            grad_in = grad_in.float()
        grad_emb = torch.ops.aten.embedding_dense_backward(grad_in, ids, vocab, -1, False)
        if embed_scale != 1.0:
            grad_emb.mul_(embed_scale)
    return grad_emb.to(emb_dtype), grad_prompt, grad_A, grad_B
