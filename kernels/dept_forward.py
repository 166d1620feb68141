"""Fused DePT embedding stage, forward: one launch writes ``[P ; E[ids] + scaling * (A @ B)[:L]]``.

    out[i, j]     = P[j]                                        j < m
    out[i, m + t] = E[ids[i, t]] + scaling * sum_k A[t, k] B[k, :]    t < L

Programs along grid axis 0 first cover the m prompt positions, then the L input positions.
A prompt program loads its P tile once and stores it into every batch row of its group; an
input program computes its (BLOCK_T x BLOCK_D) tile of scaling * A @ B once, then for each
batch row gathers the embedding rows, adds the tile and stores. All arithmetic is fp32; each
value is rounded once, at the store, to the output dtype (the embedding's dtype).
An id outside [0, V) is never read: its output row is NaN (the Python wrapper raises before
launch; this guards the paths that skip that host-side check, e.g. under torch.compile).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import buffers, tiling
from .tiling import Plan, TileConfig, choose_tiles, rank_block


@triton.jit
def _dept_fwd_kernel(
    ids_ptr, emb_ptr, prompt_ptr, a_ptr, b_ptr, out_ptr,
    batch, seq_len, vocab, dim, rank, n_prompt, rows_per_group,
    stride_ids_b, stride_emb_v, stride_out_b,
    scaling,
    HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    row_start = pid_g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, batch)
    # Pointers advance one batch row per iteration; the int64 base keeps b*(m+L)*d > 2**31 safe.
    row_base = row_start.to(tl.int64)
    n_prompt_blocks = tl.cdiv(n_prompt, BLOCK_T)

    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    out_ty = out_ptr.dtype.element_ty

    if pid_t < n_prompt_blocks:
        o_j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_jd = (o_j < n_prompt)[:, None] & m_d[None, :]
        b_p = tl.load(prompt_ptr + o_j[:, None] * dim + o_d[None, :], mask=m_jd).to(tl.float32).to(out_ty)
        p_out = out_ptr + row_base * stride_out_b + o_j[:, None] * dim + o_d[None, :]
        for _ in range(row_start, row_end):
            tl.store(p_out, b_p, mask=m_jd)
            p_out += stride_out_b
    else:
        o_t = (pid_t - n_prompt_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < seq_len
        m_td = m_t[:, None] & m_d[None, :]
        b_ab = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HAS_LORA:
            o_r = tl.arange(0, BLOCK_R)
            m_r = o_r < rank
            b_a = tl.load(a_ptr + o_t[:, None] * rank + o_r[None, :],
                          mask=m_t[:, None] & m_r[None, :], other=0.0).to(tl.float32)
            b_b = tl.load(b_ptr + o_r[:, None] * dim + o_d[None, :],
                          mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_ab = tl.dot(b_a, b_b, input_precision=DOT_PRECISION) * scaling
        p_ids = ids_ptr + row_base * stride_ids_b + o_t
        p_out = out_ptr + row_base * stride_out_b + (n_prompt + o_t)[:, None] * dim + o_d[None, :]
        for _ in range(row_start, row_end):
            b_ids = tl.load(p_ids, mask=m_t, other=0).to(tl.int64)
            m_ok = (b_ids >= 0) & (b_ids < vocab)
            b_e = tl.load(emb_ptr + b_ids[:, None] * stride_emb_v + o_d[None, :],
                          mask=m_ok[:, None] & m_td, other=float("nan")).to(tl.float32)
            tl.store(p_out, (b_e + b_ab).to(out_ty), mask=m_td)
            p_ids += stride_ids_b
            p_out += stride_out_b


def plan_dept_forward(batch: int, n_prompt: int, seq_len: int, dim: int, rank: int, element_size: int,
                      lora_16bit: bool, sm_count: Optional[int], tiles: Optional[TileConfig] = None) -> Plan:
    """Grid and launch arguments of ``_dept_fwd_kernel`` for a (batch, n_prompt + seq_len, dim) output on a
    GPU with ``sm_count`` SMs (None: the interpreter); ``tiles`` overrides :func:`tiling.choose_tiles`.
    The batch groups are ``grid[2]``.

    ``lora_16bit`` (A and B both fp16/bf16): their values are exact in tf32, so on the GPU the A @ B tile
    runs on tf32 tensor cores (exact products, fp32 sums; T5-base bf16 on sm_80: 94 registers instead
    of 181 with "ieee" FMA products, half the shared memory). fp32 A/B keep "ieee", as PyTorch's
    default fp32 matmul does.
    """
    tiles = tiles or choose_tiles(batch, n_prompt + seq_len, dim, element_size, sm_count)
    precision = "tf32" if lora_16bit and sm_count is not None else "ieee"
    grid = (triton.cdiv(n_prompt, tiles.block_t) + triton.cdiv(seq_len, tiles.block_t),
            triton.cdiv(dim, tiles.block_d), tiles.groups)
    return Plan(grid, dict(HAS_LORA=rank > 0, DOT_PRECISION=precision, BLOCK_T=tiles.block_t,
                           BLOCK_D=tiles.block_d, BLOCK_R=rank_block(rank), num_warps=tiles.num_warps))


def dept_forward(ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 tiles: TileConfig = None) -> torch.Tensor:
    """Launch the fused forward. Inputs must already be validated (see ``dept_fast.ops.checks``).

    ``ids`` (b, L) int32/int64; ``weight`` (V, d) with unit stride along d; ``prompt`` (m, d);
    ``lora_A`` (s, r); ``lora_B`` (r, d). Returns (b, m + L, d) in ``weight.dtype``.
    """
    batch, seq_len = ids.shape
    vocab, dim = weight.shape
    n_prompt, rank = prompt.shape[0], lora_A.shape[1]
    ids, prompt, lora_A, lora_B = ids.contiguous(), prompt.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = buffers.allocate((batch, n_prompt + seq_len, dim), weight.dtype, weight.device)
    if out.numel() == 0:
        return out
    lora_16bit = lora_A.element_size() == 2 and lora_B.element_size() == 2
    plan = plan_dept_forward(batch, n_prompt, seq_len, dim, rank, weight.element_size(), lora_16bit,
                             tiling._sm_count(weight.device), tiles)
    tiling.launch(
        _dept_fwd_kernel, plan,
        ids, weight, prompt, lora_A, lora_B, out,
        batch, seq_len, vocab, dim, rank, n_prompt, triton.cdiv(batch, plan.grid[2]),
        ids.stride(0), weight.stride(0), out.stride(0),
        float(scaling))
    return out
