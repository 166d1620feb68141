"""Prefix-Tuning's reparameterization output, fused: every layer's prefix K/V in attention layout.

The prefix encoder's MLP is Embedding(p, d) -> Linear(d, mid) -> tanh -> Linear(mid, N) with
N = layers * 2 * kv_heads * head_dim. The first Linear stays a cuBLAS matmul (its input is the
p x d embedding table, nothing to fuse); these kernels take its output H (p, mid) and do the rest:

    T = tanh(H)                                    (p, mid), never stored
    Y = T @ W^T + b                                (p, N)
    out[l, c, h, j, e] = Y[j, ((l * 2 + c) * kv_heads + h) * head_dim + e]

i.e. Y viewed (p, layers, 2, kv_heads, head_dim) and permuted to (layers, 2, kv_heads, p, head_dim):
the layout the prefix attention consumes (c = 0 key, c = 1 value; PEFT's ``prompt_embeddings``
column order), written directly by the forward's store instead of a (p, N) tensor plus a transpose
copy. Column n of Y lands at out offset (n // head_dim) * p * head_dim + j * head_dim + n % head_dim.

All arithmetic is fp32 (loads upcast, one rounding at each store). The products run as ``tl.dot``
with ``input_precision`` "ieee" for fp32 weights (PyTorch's default fp32 matmul precision) and
under the interpreter, "tf32" on the GPU for 16-bit weights: their values are exact in tf32, so
only T is rounded (to 10 mantissa bits, finer than the 16-bit output's own rounding).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import buffers

# GPU programs per SM the hidden-gradient kernel aims for by splitting the N reduction.
# Untuned guess until measured on a GPU (bench/RESULTS.md).
_PROGRAMS_PER_SM = 4


@triton.jit
def _tanh(x):
    """fp32 tanh to ~3e-7 relative error (no libdevice: the interpreter has none).
    |x| < 0.1: odd Taylor series to x^7; else (1 - e^-2|x|) / (1 + e^-2|x|), which loses at most
    a factor 1 / (1 - e^-0.2) ~ 5.5 of relative precision to cancellation."""
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    a2 = a * a
    near = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    r = tl.where(a < 0.1, near, far)
    return tl.where(x < 0, -r, r)


@triton.jit
def _block(start, BLOCK: tl.constexpr, size):
    """Offsets start .. start + BLOCK - 1 and their mask (< size)."""
    offsets = start + tl.arange(0, BLOCK)
    return offsets, offsets < size


@triton.jit
def _layout_offsets(o_p, o_n, n_prefix, head_dim):
    """Offsets into (groups, p, head_dim) of Y[j, n] for the (o_p x o_n) tile; int64 (out may exceed 2**31)."""
    o_g = (o_n // head_dim).to(tl.int64)
    return o_g[None, :] * n_prefix * head_dim + o_p[:, None] * head_dim + (o_n % head_dim)[None, :]


@triton.jit
def _load_matrix(ptr, o_r, o_c, m_r, m_c, n_cols):
    """fp32 (o_r x o_c) tile of a row-major matrix with ``n_cols`` columns; 0 where masked."""
    return tl.load(ptr + o_r[:, None].to(tl.int64) * n_cols + o_c[None, :], mask=m_r[:, None] & m_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _load_layout(ptr, o_p, o_n, m_p, m_n, n_prefix, head_dim):
    """fp32 (o_p x o_n) tile of Y[j, n] read from the attention layout; 0 where masked."""
    return tl.load(ptr + _layout_offsets(o_p, o_n, n_prefix, head_dim), mask=m_p[:, None] & m_n[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _prefix_kv_fwd_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr,
    n_prefix, mid, n_out, head_dim,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_n, pid_p) computes the (BLOCK_P x BLOCK_N) tile of Y = tanh(H) @ W^T + b,
    # reducing over mid in BLOCK_K steps, and scatters it into the attention layout.
    o_n, m_n = _block(tl.program_id(0) * BLOCK_N, BLOCK_N, n_out)
    o_p, m_p = _block(tl.program_id(1) * BLOCK_P, BLOCK_P, n_prefix)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, mid, BLOCK_K):
        o_k, m_k = _block(k0, BLOCK_K, mid)
        b_t = _tanh(_load_matrix(h_ptr, o_p, o_k, m_p, m_k, mid))
        b_w = _load_matrix(w_ptr, o_n, o_k, m_n, m_k, mid)
        acc += tl.dot(b_t, tl.trans(b_w), input_precision=DOT_PRECISION)
    acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_out = out_ptr + _layout_offsets(o_p, o_n, n_prefix, head_dim)
    tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m_p[:, None] & m_n[None, :])


# Backward. With G = dLoss/dout read in the attention layout (so Gy[j, n] = G at the offset above):
#     dW = Gy^T @ T          (N, mid)
#     db = sum_j Gy[j, :]    (N,)
#     dH = (Gy @ W) * (1 - T^2)     (p, mid), T = tanh(H) recomputed from H (T is never stored)
# ``_prefix_kv_bwd_weight_kernel`` gives dW and db: each program one (BLOCK_N x BLOCK_K) tile of dW,
# reducing over p; the programs of the first mid tile also reduce db. ``_prefix_kv_bwd_hidden_kernel``
# gives dH: N is long (layers * 2 * kv_dim) and p x mid small, so the N reduction is split over grid
# axis 2; each split stores its fp32 partial already multiplied by (1 - T^2) (the factor does not
# depend on n, so the partials still sum to dH) and the launcher adds the splits. No atomics: every
# gradient is bit-reproducible.


@triton.jit
def _prefix_kv_bwd_weight_kernel(
    g_ptr, h_ptr, dw_ptr, db_ptr,
    n_prefix, mid, n_out, head_dim,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_n, m_n = _block(tl.program_id(0) * BLOCK_N, BLOCK_N, n_out)
    o_k, m_k = _block(tl.program_id(1) * BLOCK_K, BLOCK_K, mid)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_prefix, BLOCK_P):
        o_p, m_p = _block(p0, BLOCK_P, n_prefix)
        b_g = _load_layout(g_ptr, o_p, o_n, m_p, m_n, n_prefix, head_dim)
        b_t = _tanh(_load_matrix(h_ptr, o_p, o_k, m_p, m_k, mid))
        acc += tl.dot(tl.trans(b_g), b_t, input_precision=DOT_PRECISION)
        acc_b += tl.sum(b_g, axis=0)
    tl.store(dw_ptr + o_n[:, None].to(tl.int64) * mid + o_k[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_n[:, None] & m_k[None, :])
    if tl.program_id(1) == 0:
        tl.store(db_ptr + o_n, acc_b.to(db_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _prefix_kv_bwd_hidden_kernel(
    g_ptr, h_ptr, w_ptr, part_ptr,
    n_prefix, mid, n_out, head_dim, n_per_split,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_p, m_p = _block(tl.program_id(0) * BLOCK_P, BLOCK_P, n_prefix)
    o_k, m_k = _block(tl.program_id(1) * BLOCK_K, BLOCK_K, mid)
    pid_s = tl.program_id(2)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, n_out)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n, m_n = _block(n0, BLOCK_N, n_end)
        b_g = _load_layout(g_ptr, o_p, o_n, m_p, m_n, n_prefix, head_dim)
        b_w = _load_matrix(w_ptr, o_n, o_k, m_n, m_k, mid)
        acc += tl.dot(b_g, b_w, input_precision=DOT_PRECISION)
    b_t = _tanh(_load_matrix(h_ptr, o_p, o_k, m_p, m_k, mid))
    p_part = part_ptr + pid_s.to(tl.int64) * n_prefix * mid + o_p[:, None] * mid + o_k[None, :]
    tl.store(p_part, acc * (1.0 - b_t * b_t), mask=m_p[:, None] & m_k[None, :])


class PrefixKVBlocks(NamedTuple):
    """Tile sizes of one launch (all powers of two >= 16, the GPU's tl.dot minimum) and the split of
    the hidden gradient's N reduction."""

    block_p: int
    block_n: int
    block_k: int
    splits: int = 1
    num_warps: int = 4


def _pow2(n: int, low: int, high: int) -> int:
    return min(high, max(low, triton.next_power_of_2(max(n, 1))))


def choose_blocks(n_prefix: int, mid: int, n_out: int, element_size: int, device: torch.device) -> PrefixKVBlocks:
    """Tiles for p x mid -> p x N. On CPU (the interpreter, ~1 ms per program) as few programs as
    possible; on the GPU 64-wide N/mid tiles and enough N splits for ``_PROGRAMS_PER_SM`` programs
    per SM in the hidden-gradient kernel (untuned guesses until measured), capped so that the fp32
    partial sums (splits x p x mid) take no more memory than the gradient they reduce (p x N)."""
    if device.type != "cuda":
        return PrefixKVBlocks(_pow2(n_prefix, 16, 64), _pow2(n_out, 16, 256), _pow2(mid, 16, 128))
    block_p, block_n, block_k = _pow2(n_prefix, 16, 64), 64, _pow2(mid, 16, 64)
    tiles = triton.cdiv(n_prefix, block_p) * triton.cdiv(mid, block_k)
    wanted = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    max_splits = max(1, n_out * element_size // (4 * mid))
    splits = max(1, min(triton.cdiv(n_out, block_n), triton.cdiv(wanted, tiles), max_splits))
    return PrefixKVBlocks(block_p, block_n, block_k, splits)


def _dot_precision(weight: torch.Tensor) -> str:
    if weight.device.type != "cuda":
        return "ieee"
    if weight.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def prefix_kv_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                      num_kv_heads: int, head_dim: int, blocks: Optional[PrefixKVBlocks] = None) -> torch.Tensor:
    """``(tanh(hidden) @ weight.T + bias)`` in the (layers, 2, kv_heads, p, head_dim) layout.

    ``hidden`` (p, mid); ``weight`` (N, mid) with N = layers * 2 * kv_heads * head_dim; ``bias`` (N,).
    Inputs must already be validated, every size >= 1 (see ``dept_fast.prefix_projection``).
    Returns ``weight.dtype``.
    """
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), bias.contiguous()
    n_prefix, mid = hidden.shape
    n_out = weight.shape[0]
    out = buffers.allocate((num_layers, 2, num_kv_heads, n_prefix, head_dim), weight.dtype, weight.device)
    blocks = blocks or choose_blocks(n_prefix, mid, n_out, weight.element_size(), weight.device)
    grid = (triton.cdiv(n_out, blocks.block_n), triton.cdiv(n_prefix, blocks.block_p))
    _prefix_kv_fwd_kernel[grid](
        hidden, weight, bias, out, n_prefix, mid, n_out, head_dim,
        DOT_PRECISION=_dot_precision(weight),
        BLOCK_P=blocks.block_p, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, num_warps=blocks.num_warps,
    )
    return out


def prefix_kv_backward(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias_dtype: torch.dtype,
                       blocks: Optional[PrefixKVBlocks] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dH, dW, db) of :func:`prefix_kv_forward` from ``grad_out`` in the attention layout.

    dH comes back in ``hidden.dtype``, dW in ``weight.dtype``, db in ``bias_dtype``.
    """
    grad_out, hidden, weight = grad_out.contiguous(), hidden.contiguous(), weight.contiguous()
    n_prefix, mid = hidden.shape
    n_out = weight.shape[0]
    head_dim = grad_out.shape[-1]
    device = weight.device
    blocks = blocks or choose_blocks(n_prefix, mid, n_out, grad_out.element_size(), device)
    meta = dict(DOT_PRECISION=_dot_precision(weight), BLOCK_P=blocks.block_p, BLOCK_N=blocks.block_n,
                BLOCK_K=blocks.block_k, num_warps=blocks.num_warps)

    grad_weight = buffers.allocate((n_out, mid), weight.dtype, device)
    grad_bias = buffers.allocate((n_out,), bias_dtype, device)
    _prefix_kv_bwd_weight_kernel[(triton.cdiv(n_out, blocks.block_n), triton.cdiv(mid, blocks.block_k))](
        grad_out, hidden, grad_weight, grad_bias, n_prefix, mid, n_out, head_dim, **meta)

    n_per_split = triton.cdiv(triton.cdiv(n_out, blocks.splits), blocks.block_n) * blocks.block_n
    partial = buffers.allocate((triton.cdiv(n_out, n_per_split), n_prefix, mid), torch.float32, device)
    grid = (triton.cdiv(n_prefix, blocks.block_p), triton.cdiv(mid, blocks.block_k), partial.shape[0])
    _prefix_kv_bwd_hidden_kernel[grid](
        grad_out, hidden, weight, partial, n_prefix, mid, n_out, head_dim, n_per_split, **meta)
    grad_hidden = (partial[0] if partial.shape[0] == 1 else partial.sum(0)).to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
