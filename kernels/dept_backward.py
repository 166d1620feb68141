"""Fused DePT embedding stage, backward: the upstream gradient is read exactly once.

With G = dLoss/dout of shape (b, m + L, d):

    S[j]    = sum_i G[i, j]                       (fp32, every position j < m + L)
    dP      = S[:m]
    Gs      = S[m:]                               (the input positions)
    dA[:L]  = scaling * Gs @ B^T,   dA[L:] = 0
    dB      = scaling * A[:L]^T @ Gs
    dE[v]   = sum over (i, t) with ids[i, t] = v of G[i, m + t]     (only if E requires grad)

``_dept_bwd_kernel`` streams G once: each program reduces its (BLOCK_T x BLOCK_D) tile over the
batch rows of its group into fp32 registers and stores the partial sum (no float atomics), and,
when dE is wanted, scatter-adds each G row into an fp32 dE buffer with relaxed atomics (no memory
fences: nothing reads dE until the kernel ends). The batch loop is software-pipelined
(``tl.range(num_stages=STAGES)``: rows i + 1 .. i + STAGES - 1 are loading, by cp.async into shared
memory, while row i is added), so every thread keeps 8-12 16-byte loads of G in flight instead of
waiting on each row; the adds still run in row order, so the sums are the same bits as unpipelined.
The reduced S is b times smaller than G; the two rank-r products on it are left to cuBLAS (fp32). dP, dA and dB
are therefore bit-for-bit deterministic; dE is deterministic only through ``deterministic=True``,
which replaces the atomics by PyTorch's sort-based embedding backward (a second read of G).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import buffers
from . import tiling
from .tiling import Plan, TileConfig, choose_tiles


@triton.jit
def _dept_bwd_kernel(
    grad_ptr, ids_ptr, colsum_ptr, grad_emb_ptr,
    batch, seq_len, vocab, dim, n_prompt, rows_per_group,
    stride_grad_b, stride_grad_t, stride_ids_b,
    SCATTER_EMB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    n_pos = n_prompt + seq_len
    row_start = pid_g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, batch)

    o_j = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_j = o_j < n_pos
    m_d = o_d < dim
    m_jd = m_j[:, None] & m_d[None, :]
    # Input positions t = j - m (only meaningful where j >= m).
    o_t = o_j - n_prompt
    m_t = m_j & (o_j >= n_prompt)

    # Pointers advance one batch row per iteration; the int64 base keeps b*(m+L)*d > 2**31 safe.
    row_base = row_start.to(tl.int64)
    p_grad = grad_ptr + row_base * stride_grad_b + o_j[:, None] * stride_grad_t + o_d[None, :]
    p_ids = ids_ptr + row_base * stride_ids_b + o_t
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in tl.range(row_start, row_end, num_stages=STAGES):
        b_g = tl.load(p_grad, mask=m_jd, other=0.0).to(tl.float32)
        acc += b_g
        if SCATTER_EMB:
            b_ids = tl.load(p_ids, mask=m_t, other=-1).to(tl.int64)
            m_ok = m_t & (b_ids >= 0) & (b_ids < vocab)
            tl.atomic_add(grad_emb_ptr + b_ids[:, None] * dim + o_d[None, :], b_g,
                          mask=m_ok[:, None] & m_d[None, :], sem="relaxed")
        p_grad += stride_grad_b
        p_ids += stride_ids_b
    p_sum = colsum_ptr + pid_g.to(tl.int64) * n_pos * dim + o_j[:, None] * dim + o_d[None, :]
    tl.store(p_sum, acc, mask=m_jd)


def plan_dept_backward(batch: int, n_pos: int, dim: int, element_size: int, scatter: bool,
                       sm_count: Optional[int], tiles: Optional[TileConfig] = None) -> Plan:
    """Grid and launch arguments of ``_dept_bwd_kernel`` for G of shape (batch, n_pos, dim) on a GPU with
    ``sm_count`` SMs (None: the interpreter); ``tiles`` overrides :func:`tiling.choose_tiles`. The batch
    groups are ``grid[2]``."""
    tiles = tiles or choose_tiles(batch, n_pos, dim, element_size, sm_count,
                                  max_groups=max(1, batch * element_size // 32))
    grid = (triton.cdiv(n_pos, tiles.block_t), triton.cdiv(dim, tiles.block_d), tiles.groups)
    return Plan(grid, dict(SCATTER_EMB=scatter, BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d,
                           STAGES=tiling._BWD_STAGES, num_warps=tiles.num_warps))


def dept_backward(
    grad_out: torch.Tensor, ids: torch.Tensor, vocab: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, n_prompt: int, prompt_dtype: torch.dtype, emb_dtype: Optional[torch.dtype],
    deterministic: bool = False, tiles: TileConfig = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dE, dP, dA, dB) of the fused DePT stage from ``grad_out`` (b, m + L, d).

    ``emb_dtype`` None means the embedding is frozen and dE is not computed (returned None).
    dP, dA, dB come back in the dtypes of prompt, lora_A and lora_B.
    """
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    ids = ids.contiguous()
    batch, seq_len = ids.shape
    dim = grad_out.shape[-1]
    n_pos = n_prompt + seq_len
    device = grad_out.device
    scatter = emb_dtype is not None and not deterministic
    grad_emb = torch.zeros((vocab, dim), dtype=torch.float32, device=device) if scatter else None

    plan = plan_dept_backward(batch, n_pos, dim, grad_out.element_size(), scatter, tiling._sm_count(device), tiles)
    groups = plan.grid[2]
    colsum = buffers.allocate((groups, n_pos, dim), torch.float32, device)
    if colsum.numel() and batch:
        tiling.launch(
            _dept_bwd_kernel, plan,
            grad_out, ids, colsum, grad_emb if scatter else colsum,
            batch, seq_len, vocab, dim, n_prompt, triton.cdiv(batch, groups),
            grad_out.stride(0), grad_out.stride(1), ids.stride(0))
    else:
        colsum.zero_()
    col = colsum[0] if groups == 1 else colsum.sum(0)

    grad_prompt = col[:n_prompt].to(prompt_dtype)
    g_in = col[n_prompt:]
    grad_A = buffers.allocate(lora_A.shape, lora_A.dtype, device)
    grad_A[seq_len:].zero_()
    grad_A[:seq_len] = scaling * (g_in @ lora_B.t().float())
    grad_B = (scaling * (lora_A[:seq_len].t().float() @ g_in)).to(lora_B.dtype)

    if emb_dtype is None:
        return None, grad_prompt, grad_A, grad_B
    if deterministic:
        grad_emb = torch.ops.aten.embedding_dense_backward(grad_out[:, n_prompt:], ids, vocab, -1, False)
    return grad_emb.to(emb_dtype), grad_prompt, grad_A, grad_B
