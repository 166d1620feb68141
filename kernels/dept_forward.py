"""Fused DePT embedding stage, forward: one launch writes ``[P_a ; c * E[ids] + s_a * (A_a @ B_a)[:L]]``
for the whole batch, row i taking adapter a = a(i) (one adapter: a = 0 for every row).

    out[i, j]     = P_a[j]                                               j < m (M with packed adapters)
    out[i, m + t] = c * E[ids[i, t]] + s_a * sum_k A_a[t, k] B_a[k, :]      t < L

c = ``embed_scale``: what the model's own embedding module multiplies its rows by (Gemma, BART with
``scale_embedding``: sqrt(d); 1 for a plain ``nn.Embedding``), one fp32 multiplier shared by every
adapter (they share E). Its value is a runtime fp32 argument (a new c never recompiles); whether it
is applied at all is the constexpr ``EMBED_SCALED`` (c != 1), so c = 1 compiles to exactly the kernel
without a scale (a runtime multiply by 1 cost up to 10 registers on sm_80, T5-base 16-bit).

Programs along grid axis 0 first cover the prompt positions, then the L input positions; axis 2
enumerates segments, each a group of one adapter's rows (``adapter_rows``; one adapter: a group of
the batch). A program computes its tile once for its segment: a prompt program loads its P_a tile and
stores it into every row of the segment; an input program computes its (BLOCK_T x BLOCK_D) tile of
s_a * A_a @ B_a, then for each row of the segment gathers the embedding rows, scales them by c, adds
the tile and stores. So the update costs one tile per (tile, adapter, group), not one per row; with k
adapters the A_a, B_a tiles are read k x groups times in all, from L2 (the packed B is k R d elements). All
arithmetic is fp32; each value is rounded once, at the store, to the output dtype (the embedding's dtype).
An id outside [0, V) is never read: its output row is NaN (the Python wrapper raises before
launch; this guards the paths that skip that host-side check, e.g. under torch.compile).
"""
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import buffers, tiling
from .adapter_rows import AdapterRows, _batch_row, _segment_rows, as_packs
from .tiling import Plan, TileConfig, choose_tiles, rank_block


# Program (t-block, d-block, segment s = (a, g)), rows i of the segment in visiting order:
#     prompt block:  out[i, j, :]     = P_a[j, :]                                          j < m
#     input block:   U[t, :]          = s_a * sum_k A_a[t, k] B_a[k, :]       (fp32, once per program)
#                    out[i, m + t, :] = c * E[ids[i, t], :] + U[t, :]   (fp32, rounded once at the store;
#                                       c = embed_scale, multiplied only when EMBED_SCALED, i.e. c != 1)
@triton.jit
def _dept_fwd_kernel(
    ids_ptr, emb_ptr, prompt_ptr, a_ptr, b_ptr, scale_ptr, order_ptr, runs_ptr, out_ptr,
    batch, seq_len, vocab, dim, rank, n_prompt, groups,
    stride_ids_b, stride_emb_v, stride_out_b, stride_prompt_k, stride_a_k, stride_b_k,
    scaling, embed_scale,
    INDEXED: tl.constexpr, HAS_LORA: tl.constexpr, EMBED_SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)  # segment: one group of adapter a's rows
    row_start, row_end = _segment_rows(runs_ptr, pid_s, groups, batch, INDEXED)
    a = 0
    s_a = scaling
    if INDEXED:
        a = tl.cast(pid_s // groups, tl.int64)
        s_a = tl.load(scale_ptr + a)
    n_prompt_blocks = tl.cdiv(n_prompt, BLOCK_T)

    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    out_ty = out_ptr.dtype.element_ty

    if pid_t < n_prompt_blocks:
        o_j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_jd = (o_j < n_prompt)[:, None] & m_d[None, :]
        o_out = o_j[:, None] * dim + o_d[None, :]
        b_p = tl.load(prompt_ptr + a * stride_prompt_k + o_out, mask=m_jd).to(tl.float32).to(out_ty)
        for i in range(row_start, row_end):
            # int64 row offsets: b*(m+L)*d may exceed 2**31.
            row = _batch_row(order_ptr, i, INDEXED)
            tl.store(out_ptr + row * stride_out_b + o_out, b_p, mask=m_jd)
    else:
        o_t = (pid_t - n_prompt_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < seq_len
        m_td = m_t[:, None] & m_d[None, :]
        b_ab = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if HAS_LORA:
            o_r = tl.arange(0, BLOCK_R)
            m_r = o_r < rank
            b_a = tl.load(a_ptr + a * stride_a_k + o_t[:, None] * rank + o_r[None, :],
                          mask=m_t[:, None] & m_r[None, :], other=0.0).to(tl.float32)
            b_b = tl.load(b_ptr + a * stride_b_k + o_r[:, None] * dim + o_d[None, :],
                          mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_ab = tl.dot(b_a, b_b, input_precision=DOT_PRECISION) * s_a
        o_out = (n_prompt + o_t)[:, None] * dim + o_d[None, :]
        for i in range(row_start, row_end):
            row = _batch_row(order_ptr, i, INDEXED)
            b_ids = tl.load(ids_ptr + row * stride_ids_b + o_t, mask=m_t, other=0).to(tl.int64)
            m_ok = (b_ids >= 0) & (b_ids < vocab)
            b_e = tl.load(emb_ptr + b_ids[:, None] * stride_emb_v + o_d[None, :],
                          mask=m_ok[:, None] & m_td, other=float("nan")).to(tl.float32)
            if EMBED_SCALED:
                b_e = b_e * embed_scale
            tl.store(out_ptr + row * stride_out_b + o_out, (b_e + b_ab).to(out_ty), mask=m_td)


def plan_dept_forward(batch: int, n_prompt: int, seq_len: int, dim: int, rank: int, element_size: int,
                      lora_16bit: bool, sm_count: Optional[int], adapters: Optional[int] = None,
                      tiles: Optional[TileConfig] = None, embed_scaled: bool = False) -> Plan:
    """Grid and launch arguments of ``_dept_fwd_kernel`` for a (batch, n_prompt + seq_len, dim) output on a
    GPU with ``sm_count`` SMs (None: the interpreter); ``adapters``: k packed adapters, one per row (None:
    one adapter); ``tiles`` overrides :func:`tiling.choose_tiles`; ``embed_scaled``: E's rows are multiplied
    by an ``embed_scale`` other than 1. ``grid[2]`` is k x the groups per adapter.

    ``lora_16bit`` (A and B both fp16/bf16): their values are exact in tf32, so on the GPU the A @ B tile
    runs on tf32 tensor cores (exact products, fp32 sums; T5-base bf16 on sm_80: 94 registers instead
    of 181 with "ieee" FMA products, half the shared memory). fp32 A/B keep "ieee", as PyTorch's
    default fp32 matmul does.
    """
    runs = adapters or 1
    tiles = tiles or choose_tiles(batch, n_prompt + seq_len, dim, element_size, sm_count, runs=runs)
    precision = "tf32" if lora_16bit and sm_count is not None else "ieee"
    grid = (triton.cdiv(n_prompt, tiles.block_t) + triton.cdiv(seq_len, tiles.block_t),
            triton.cdiv(dim, tiles.block_d), runs * tiles.groups)
    return Plan(grid, dict(INDEXED=adapters is not None, HAS_LORA=rank > 0, EMBED_SCALED=embed_scaled,
                           DOT_PRECISION=precision, BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d,
                           BLOCK_R=rank_block(rank),
                           num_warps=tiles.num_warps))


def dept_forward(ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: Union[float, torch.Tensor], rows: Optional[AdapterRows] = None,
                 tiles: TileConfig = None, *, embed_scale: float = 1.0) -> torch.Tensor:
    """Launch the fused forward. Inputs must already be validated (see ``dept_fast.ops.checks``).

    ``ids`` (b, L) int32/int64; ``weight`` (V, d) with unit stride along d. One adapter (``rows``
    None): ``prompt`` (m, d), ``lora_A`` (s, r), ``lora_B`` (r, d), ``scaling`` a float. k packed
    adapters: ``prompt`` (k, M, d), ``lora_A`` (k, S, R), ``lora_B`` (k, R, d), ``scaling`` (k,) fp32,
    ``rows`` each row's adapter (:func:`adapter_rows.sort_rows`). ``embed_scale`` (a float) multiplies
    every gathered row of E, as the model's embedding module does. Returns (b, m + L, d) in ``weight.dtype``.
    """
    batch, seq_len = ids.shape
    vocab, dim = weight.shape
    indexed = rows is not None
    prompt, lora_A, lora_B = (t.contiguous() for t in as_packs(prompt, lora_A, lora_B))
    adapters, n_prompt, _ = prompt.shape
    rank = lora_A.shape[2]
    ids = ids.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = buffers.allocate((batch, n_prompt + seq_len, dim), weight.dtype, weight.device)
    if out.numel() == 0:
        return out
    lora_16bit = lora_A.element_size() == 2 and lora_B.element_size() == 2
    plan = plan_dept_forward(batch, n_prompt, seq_len, dim, rank, weight.element_size(), lora_16bit,
                             tiling._sm_count(weight.device), adapters if indexed else None, tiles,
                             embed_scaled=embed_scale != 1.0)
    tiling.launch(
        _dept_fwd_kernel, plan,
        ids, weight, prompt, lora_A, lora_B, scaling if indexed else ids, rows.order if indexed else ids,
        rows.runs if indexed else ids, out,  # ids: a pointer that a single-adapter launch never reads
        batch, seq_len, vocab, dim, rank, n_prompt, plan.grid[2] // (adapters if indexed else 1),
        ids.stride(0), weight.stride(0), out.stride(0), prompt.stride(0), lora_A.stride(0), lora_B.stride(0),
        1.0 if indexed else float(scaling), float(embed_scale))
    return out
