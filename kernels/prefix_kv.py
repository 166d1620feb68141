"""Prefix-Tuning's reparameterization output, fused: every layer's prefix K/V in attention layout.

The prefix encoder's MLP is Embedding(p, d) -> Linear(d, mid) -> tanh -> Linear(mid, N) with
N = layers * 2 * kv_heads * head_dim. The first Linear stays a cuBLAS matmul (its input is the
p x d embedding table, nothing to fuse); these kernels take its output H (p, mid) and do the rest:

    T = tanh(H)                                    (p, mid), computed once per call by torch.tanh
    Y = T @ W^T + b                                (p, N)
    out[l, c, h, j, e] = Y[j, ((l * 2 + c) * kv_heads + h) * head_dim + e]

i.e. Y viewed (p, layers, 2, kv_heads, head_dim) and permuted to (layers, 2, kv_heads, p, head_dim):
the layout the prefix attention consumes (c = 0 key, c = 1 value; PEFT's ``prompt_embeddings``
column order), written directly by the forward's store instead of a (p, N) tensor plus a transpose
copy. Column n of Y lands at out offset (n // head_dim) * p * head_dim + j * head_dim + n % head_dim.

Grouped: G encoders of one shape (p, mid, layout, dtypes) run in one launch per kernel, group g on grid
axis 1. H, T, the output and every gradient are stacked over the groups (G, ...); each group's W and b
stay where they are, reached through a (2, G) int64 table of element offsets from group 0's tensors
(16 G bytes, copied asynchronously per call; its gcd with 16 is the divisibility the kernels assert,
so aligned parameters keep their vectorized loads). One group (``GROUPED`` false) has no table and
compiles to the single-encoder kernel of before. Bytes per group are the ones below; docs/prefix-tuning.md
has the BART-large (three prefixes) estimate.

All arithmetic is fp32 (loads upcast, one rounding at each store). The products run as ``tl.dot``
with ``input_precision`` "ieee" for fp32 weights (PyTorch's default fp32 matmul precision) and
under the interpreter, "tf32" on the GPU for 16-bit weights: their values are exact in tf32, so
only T is rounded (to 10 mantissa bits, finer than the 16-bit output's own rounding).

T is a (p, mid) tensor (205 KB in fp32 at p 100, mid 512) that every program reads from L2:
computing tanh inside the kernels instead would repeat it once per N tile, ~134M tanh per call at
Llama-7B dims, an estimated 0.1 ms of ALU time against a 0.11 ms memory floor.

HBM bytes (estimates from the tiles the GPU plans pick, not measured). Each W tile is read by one
program (BLOCK_P = 128 covers p <= 128; for longer prefixes the p blocks of an N tile are adjacent
in launch order and share it through L2); each G tile is read once per backward kernel (the mid
blocks that share it are adjacent in launch order). MB = 1e6 bytes.

    Llama-7B, bf16: p 100, mid 512, N = 32 layers * 2 * 32 heads * 128 = 262144
      W = N * mid * 2 = 268.4   Y (and G) = p * N * 2 = 52.4   b = 0.5   H = 0.1   T: 0.2 (fp32) + 0.1 (fp16)
      forward   minimum W + b + H + Y                                     = 321.5
                ours    minimum + T (written 0.3, read 0.3)                ~ 322.1   (1.00x)
      backward  minimum G + W + H + dW + db + dH                           = 589.9
                ours    weight kernel: G + T + dW + db                     = 321.6
                        hidden kernel: G + W + T + 66 splits * p * mid * 4 written and read
                        (2 * 13.5) + dH                                    = 348.2
                        tanh + fp16 copy of T                              ~   0.6   -> 670.4 (1.14x)
    T5-base, bf16: p 100, mid 512, N = 12 * 2 * 12 * 64 = 18432
      W = 18.87   Y (and G) = 3.69   b = 0.04   H = 0.10
      forward   minimum 22.70, ours ~ 23.3 (1.03x)
      backward  minimum 41.67, ours + G again (3.69) + 9 splits of partials (2 * 1.84) + T (0.6) ~ 49.6 (1.19x)
    T5-base, fp32 (W 37.75, G 7.37): forward 1.01x; backward minimum 83.3, ours + G again + 9 splits
      (2 * 1.84) ~ 94.4 (1.13x)

L2 reads per HBM byte (T and the shared G tiles; 16-bit tiles): forward ~1.5, weight gradient ~2.0,
hidden gradient ~1.5; larger tiles would spill. fp32 weights use FMA ("ieee") products, so their
launches are compute-bound (2 * 128 * mid * N = 34 GFLOP of FMA at Llama-7B dims), not memory-bound.
"""
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import buffers, tiling
from .tiling import Plan

# GPU programs per SM the hidden-gradient kernel aims for by splitting the N reduction: its 16-bit
# tile (~190 registers x 256 threads, 64-96 KB shared) fits one or two per SM; more programs would
# only add fp32 partial sums. Untuned until measured on a GPU (bench/RESULTS.md).
_PROGRAMS_PER_SM = 2
# GPU tiles (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel: 16-bit weights (tf32
# tensor-core products) and fp32 weights ("ieee" FMA products, which hold both operands in
# registers: smaller tiles, else they spill). Chosen from the compile check's registers and spills
# (tests/kernel_compile.py) and the byte counts in the module docstring; not timed on a GPU yet.
_TILES_16BIT = {"forward": (128, 128, 32, 8, 4), "weight": (64, 128, 64, 8, 3), "hidden": (128, 64, 128, 8, 3)}
_TILES_FP32 = {"forward": (128, 32, 16, 8, 3), "weight": (32, 64, 32, 8, 3), "hidden": (128, 32, 16, 8, 3)}


@triton.jit
def _block(start, BLOCK: tl.constexpr, size):
    """Offsets start .. start + BLOCK - 1 and their mask (< size)."""
    offsets = start + tl.arange(0, BLOCK)
    return offsets, offsets < size


@triton.jit
def _layout_offsets(o_p, o_n, n_prefix, HEAD_DIM: tl.constexpr):
    """Offsets into (groups, p, head_dim) of Y[j, n] for the (o_p x o_n) tile; int64 (out may exceed 2**31).
    HEAD_DIM is a constexpr so that the compiler sees runs of contiguous n and vectorizes the accesses."""
    o_g = (o_n // HEAD_DIM).to(tl.int64)
    return o_g[None, :] * n_prefix * HEAD_DIM + o_p[:, None] * HEAD_DIM + (o_n % HEAD_DIM)[None, :]


@triton.jit
def _load_matrix(ptr, o_r, o_c, m_r, m_c, n_cols):
    """fp32 (o_r x o_c) tile of a row-major matrix with ``n_cols`` columns; 0 where masked."""
    return tl.load(ptr + o_r[:, None].to(tl.int64) * n_cols + o_c[None, :], mask=m_r[:, None] & m_c[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _load_layout(ptr, o_p, o_n, m_p, m_n, n_prefix, HEAD_DIM: tl.constexpr):
    """fp32 (o_p x o_n) tile of Y[j, n] read from the attention layout; 0 where masked."""
    return tl.load(ptr + _layout_offsets(o_p, o_n, n_prefix, HEAD_DIM), mask=m_p[:, None] & m_n[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _group_offset(offsets_ptr, row, n_groups, OFFSET_ALIGN: tl.constexpr):
    """Elements from group 0's tensor to group ``program_id(1)``'s: entry ``row, program_id(1)`` of the
    (tensors, n_groups) int64 table; OFFSET_ALIGN divides every entry (the launcher's gcd)."""
    return tl.multiple_of(tl.load(offsets_ptr + row * n_groups + tl.program_id(1)), OFFSET_ALIGN)


@triton.jit
def _prefix_kv_fwd_kernel(
    t_ptr, w_ptr, b_ptr, out_ptr, offsets_ptr,
    n_groups, n_prefix, mid, n_out,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUPED: tl.constexpr, OFFSET_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid, g) computes the (BLOCK_P x BLOCK_N) tile of Y_g = T_g @ W_g^T + b_g, reducing over
    # mid in BLOCK_K steps, and scatters it into group g's attention layout. p-blocks are the
    # fastest-varying index, so the programs that read the same W tile are launched (and run)
    # together. T and out are stacked over the groups; W_g and b_g are wherever their parameters
    # live, reached from group 0's by the offsets table (no copy of the weights). One group
    # (GROUPED false, no table): group 0's pointers as they are, the single-encoder kernel.
    if GROUPED:
        g = tl.program_id(1).to(tl.int64)
        t_ptr += g * n_prefix * mid
        out_ptr += g * n_prefix * n_out
        w_ptr += _group_offset(offsets_ptr, 0, n_groups, OFFSET_ALIGN)
        b_ptr += _group_offset(offsets_ptr, 1, n_groups, OFFSET_ALIGN)
    n_pblocks = tl.cdiv(n_prefix, BLOCK_P)
    o_p, m_p = _block(tl.program_id(0) % n_pblocks * BLOCK_P, BLOCK_P, n_prefix)
    o_n, m_n = _block(tl.program_id(0) // n_pblocks * BLOCK_N, BLOCK_N, n_out)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, mid, BLOCK_K):
        o_k, m_k = _block(k0, BLOCK_K, mid)
        b_t = _load_matrix(t_ptr, o_p, o_k, m_p, m_k, mid)
        b_w = _load_matrix(w_ptr, o_n, o_k, m_n, m_k, mid)
        acc += tl.dot(b_t, tl.trans(b_w), input_precision=DOT_PRECISION)
    acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_out = out_ptr + _layout_offsets(o_p, o_n, n_prefix, HEAD_DIM)
    tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m_p[:, None] & m_n[None, :])


# Backward, per group g (axis 1 of every grid; the groups share nothing). With G = dLoss/dout read
# in the attention layout (so Gy[j, n] = G at the offset above):
#     dW = Gy^T @ T          (N, mid)
#     db = sum_j Gy[j, :]    (N,)
#     dH = (Gy @ W) * (1 - T^2)     (p, mid)
# G, T, dW, db and the partial sums are stacked over the groups; W_g is read through the offsets table.
# ``_prefix_kv_bwd_weight_kernel`` gives dW and db: each program one (BLOCK_N x BLOCK_K) tile of dW,
# reducing over p; the programs of the first mid tile also reduce db. mid blocks vary fastest, so
# the programs that read the same G columns run together. ``_prefix_kv_bwd_hidden_kernel`` gives
# dH: N is long (layers * 2 * kv_dim) and p x mid small, so the N reduction is split into ranges;
# each split stores its fp32 partial already multiplied by (1 - T^2) (the factor does not depend
# on n, so the partials still sum to dH) and the launcher adds the splits. Within a split, mid
# blocks vary fastest (they share G tiles), then p blocks (they share W tiles). No atomics: every
# gradient is bit-reproducible.


@triton.jit
def _prefix_kv_bwd_weight_kernel(
    g_ptr, t_ptr, dw_ptr, db_ptr,
    n_prefix, mid, n_out,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if GROUPED:
        g = tl.program_id(1).to(tl.int64)
        g_ptr += g * n_prefix * n_out
        t_ptr += g * n_prefix * mid
        dw_ptr += g * n_out * mid
        db_ptr += g * n_out
    n_kblocks = tl.cdiv(mid, BLOCK_K)
    pid_k = tl.program_id(0) % n_kblocks
    o_k, m_k = _block(pid_k * BLOCK_K, BLOCK_K, mid)
    o_n, m_n = _block(tl.program_id(0) // n_kblocks * BLOCK_N, BLOCK_N, n_out)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_prefix, BLOCK_P):
        o_p, m_p = _block(p0, BLOCK_P, n_prefix)
        b_g = _load_layout(g_ptr, o_p, o_n, m_p, m_n, n_prefix, HEAD_DIM)
        b_t = _load_matrix(t_ptr, o_p, o_k, m_p, m_k, mid)
        acc += tl.dot(tl.trans(b_g), b_t, input_precision=DOT_PRECISION)
        acc_b += tl.sum(b_g, axis=0)
    tl.store(dw_ptr + o_n[:, None].to(tl.int64) * mid + o_k[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_n[:, None] & m_k[None, :])
    if pid_k == 0:
        tl.store(db_ptr + o_n, acc_b.to(db_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _prefix_kv_bwd_hidden_kernel(
    g_ptr, t_ptr, w_ptr, part_ptr, offsets_ptr,
    n_groups, n_prefix, mid, n_out, n_per_split, n_splits,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUPED: tl.constexpr, OFFSET_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if GROUPED:
        g = tl.program_id(1).to(tl.int64)
        g_ptr += g * n_prefix * n_out
        t_ptr += g * n_prefix * mid
        part_ptr += g * n_splits * n_prefix * mid
        w_ptr += _group_offset(offsets_ptr, 0, n_groups, OFFSET_ALIGN)
    n_kblocks = tl.cdiv(mid, BLOCK_K)
    n_pblocks = tl.cdiv(n_prefix, BLOCK_P)
    pid = tl.program_id(0)
    o_k, m_k = _block(pid % n_kblocks * BLOCK_K, BLOCK_K, mid)
    o_p, m_p = _block(pid // n_kblocks % n_pblocks * BLOCK_P, BLOCK_P, n_prefix)
    pid_s = pid // (n_kblocks * n_pblocks)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, n_out)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n, m_n = _block(n0, BLOCK_N, n_out)  # n_per_split is a multiple of BLOCK_N: no tile crosses n_end
        b_g = _load_layout(g_ptr, o_p, o_n, m_p, m_n, n_prefix, HEAD_DIM)
        b_w = _load_matrix(w_ptr, o_n, o_k, m_n, m_k, mid)
        acc += tl.dot(b_g, b_w, input_precision=DOT_PRECISION)
    b_t = _load_matrix(t_ptr, o_p, o_k, m_p, m_k, mid)
    p_part = part_ptr + pid_s.to(tl.int64) * n_prefix * mid + o_p[:, None] * mid + o_k[None, :]
    tl.store(p_part, acc * (1.0 - b_t * b_t), mask=m_p[:, None] & m_k[None, :])


class PrefixKVBlocks(NamedTuple):
    """Tile sizes of one launch (all powers of two >= 16, the GPU's tl.dot minimum), the split of the
    hidden gradient's N reduction, warps and software-pipeline stages."""

    block_p: int
    block_n: int
    block_k: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _pow2(n: int, low: int, high: int) -> int:
    return min(high, max(low, triton.next_power_of_2(max(n, 1))))


def _precision(weight_dtype: torch.dtype, sm_count: Optional[int]) -> str:
    if sm_count is None:
        return "ieee"
    if weight_dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _gpu_blocks(kernel: str, n_prefix: int, mid: int, weight_dtype: torch.dtype) -> PrefixKVBlocks:
    """The GPU tiles of ``kernel``, p and mid tiles shrunk to the problem (never below 16)."""
    block_p, block_n, block_k, num_warps, num_stages = (_TILES_FP32 if weight_dtype == torch.float32
                                                        else _TILES_16BIT)[kernel]
    return PrefixKVBlocks(_pow2(n_prefix, 16, block_p), block_n, _pow2(mid, 16, block_k), num_warps=num_warps,
                          num_stages=num_stages)


def _tanh_operand(tanh: torch.Tensor, precision: str) -> torch.Tensor:
    """T as the products read it: fp16 under tf32 (|T| <= 1, and fp16's 10 mantissa bits are tf32's, so the
    tensor cores see the same values; half the bytes of fp32), else fp32."""
    return tanh.half() if precision == "tf32" else tanh


def _meta(blocks: PrefixKVBlocks, head_dim: int, weight_dtype: torch.dtype, sm_count: Optional[int],
          groups: int) -> dict:
    return dict(HEAD_DIM=head_dim, DOT_PRECISION=_precision(weight_dtype, sm_count), GROUPED=groups > 1,
                BLOCK_P=blocks.block_p, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, num_warps=blocks.num_warps,
                num_stages=blocks.num_stages)


def _interpreter_blocks(n_prefix: int, mid: int, n_out: int) -> PrefixKVBlocks:
    """Under the interpreter (~1 ms per program) as few programs as possible."""
    return PrefixKVBlocks(_pow2(n_prefix, 16, 64), _pow2(n_out, 16, 256), _pow2(mid, 16, 128))


def plan_prefix_kv_forward(n_prefix: int, mid: int, n_out: int, head_dim: int, weight_dtype: torch.dtype,
                           sm_count: Optional[int], blocks: Optional[PrefixKVBlocks] = None, groups: int = 1) -> Plan:
    """Grid and launch arguments of ``_prefix_kv_fwd_kernel`` for ``groups`` encoders of this shape on a
    GPU with ``sm_count`` SMs (None: the interpreter); ``blocks`` overrides the tiles. The grid is
    (tiles, groups, 1). On the GPU the N tile is halved (down to 16) while the grid has fewer
    programs than SMs."""
    if blocks is None:
        blocks = _interpreter_blocks(n_prefix, mid, n_out) if sm_count is None else \
            _gpu_blocks("forward", n_prefix, mid, weight_dtype)
        while sm_count is not None and blocks.block_n > 16 and \
                groups * triton.cdiv(n_prefix, blocks.block_p) * triton.cdiv(n_out, blocks.block_n) < sm_count:
            blocks = blocks._replace(block_n=blocks.block_n // 2)
    programs = triton.cdiv(n_prefix, blocks.block_p) * triton.cdiv(n_out, blocks.block_n)
    return Plan((programs, groups, 1), _meta(blocks, head_dim, weight_dtype, sm_count, groups))


def plan_prefix_kv_backward(n_prefix: int, mid: int, n_out: int, head_dim: int, grad_element_size: int,
                            weight_dtype: torch.dtype, sm_count: Optional[int], blocks: Optional[PrefixKVBlocks] = None,
                            groups: int = 1) -> Tuple[Plan, Plan, int]:
    """(weight-gradient plan, hidden-gradient plan, N columns per split of the hidden gradient) for
    ``groups`` encoders of this shape (grids (tiles, groups, 1)).

    On the GPU the hidden gradient's N reduction is split for ``_PROGRAMS_PER_SM`` programs per SM
    (counting every group's), capped so that the fp32 partial sums (splits x p x mid, written once
    and read once by the sum) move no more bytes than G (p x N) itself; while that leaves SMs idle,
    the mid tile and then the p tile are halved (down to 16) for more programs.
    """
    if blocks is None and sm_count is None:
        blocks = _interpreter_blocks(n_prefix, mid, n_out)
    weight_blocks = blocks or _gpu_blocks("weight", n_prefix, mid, weight_dtype)
    hidden_blocks = blocks or _gpu_blocks("hidden", n_prefix, mid, weight_dtype)
    weight_grid = (triton.cdiv(mid, weight_blocks.block_k) * triton.cdiv(n_out, weight_blocks.block_n), groups, 1)

    def tiles(b: PrefixKVBlocks) -> int:
        return triton.cdiv(mid, b.block_k) * triton.cdiv(n_prefix, b.block_p)

    if blocks is None:
        max_splits = max(1, n_out * grad_element_size // (2 * 4 * mid))
        while True:
            splits = max(1, min(triton.cdiv(n_out, hidden_blocks.block_n), max_splits,
                                triton.cdiv(_PROGRAMS_PER_SM * sm_count, groups * tiles(hidden_blocks))))
            if groups * tiles(hidden_blocks) * splits >= sm_count:
                break
            if hidden_blocks.block_k > 32:
                hidden_blocks = hidden_blocks._replace(block_k=hidden_blocks.block_k // 2)
            elif hidden_blocks.block_p > 16:
                hidden_blocks = hidden_blocks._replace(block_p=hidden_blocks.block_p // 2)
            elif hidden_blocks.block_k > 16:
                hidden_blocks = hidden_blocks._replace(block_k=hidden_blocks.block_k // 2)
            else:
                break
        hidden_blocks = hidden_blocks._replace(splits=splits)
    n_per_split = triton.cdiv(triton.cdiv(n_out, hidden_blocks.splits), hidden_blocks.block_n) * hidden_blocks.block_n
    hidden_grid = (tiles(hidden_blocks) * triton.cdiv(n_out, n_per_split), groups, 1)
    return (Plan(weight_grid, _meta(weight_blocks, head_dim, weight_dtype, sm_count, groups)),
            Plan(hidden_grid, _meta(hidden_blocks, head_dim, weight_dtype, sm_count, groups)), n_per_split)


def _offsets_table(rows: Sequence[Sequence[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], int]:
    """(table, align): ``table[r, g]`` = elements from ``rows[r][0]`` to ``rows[r][g]`` (int64, on their
    device), through which a program of group g reaches its tensors without any copy of them; ``align``
    = the gcd of 16 and every entry (a divisibility the kernels may tell the compiler). No table for one
    group: the kernels then read group 0's pointers as they are."""
    if len(rows[0]) == 1:
        return None, 16
    offsets = []
    for tensors in rows:
        size = tensors[0].element_size()
        for t in tensors:
            distance = t.data_ptr() - tensors[0].data_ptr()
            if distance % size:
                raise ValueError(f"grouped prefix tensors must be aligned to their {t.dtype} elements; got one "
                                 f"{distance} bytes away from group 0's (make it .clone())")
            offsets.append(distance // size)
    device = rows[0][0].device
    table = torch.tensor(offsets, dtype=torch.int64).view(len(rows), -1)
    # Pinned, so that the copy is asynchronous (the host buffer is kept until the copy has run).
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
    return table, math.gcd(16, *offsets)


def _with_alignment(plan: Plan, align: int) -> Plan:
    return plan._replace(meta={**plan.meta, "OFFSET_ALIGN": align})


def _check_group(tensors: Sequence[torch.Tensor], shape: Tuple[int, ...], name: str) -> None:
    """Every group's ``name`` has ``shape`` and group 0's dtype and device (the launch reads them alike)."""
    for g, t in enumerate(tensors):
        if tuple(t.shape) != shape or t.dtype != tensors[0].dtype or t.device != tensors[0].device:
            raise ValueError(f"group {g}'s {name} is {tuple(t.shape)} {t.dtype} on {t.device}; group 0's is "
                             f"{shape} {tensors[0].dtype} on {tensors[0].device}")


def grouped_prefix_kv_forward(hidden: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                              num_layers: int, num_kv_heads: int, head_dim: int,
                              blocks: Optional[PrefixKVBlocks] = None) -> torch.Tensor:
    """``tanh(hidden[g]) @ weights[g].T + biases[g]`` for every group g, in one launch, each in the
    (layers, 2, kv_heads, p, head_dim) layout.

    ``hidden`` (G, p, mid); ``weights[g]`` (N, mid) with N = layers * 2 * kv_heads * head_dim, one dtype
    and device; ``biases[g]`` (N,). The weights and biases are read where they are (no copy).
    Inputs must already be validated, every size >= 1 (see ``dept_fast.ops.checks``).
    Returns (G, layers, 2, kv_heads, p, head_dim) in the weights' dtype.
    """
    hidden = hidden.contiguous()
    weights, biases = [w.contiguous() for w in weights], [b.contiguous() for b in biases]
    n_groups, n_prefix, mid = hidden.shape
    n_out = weights[0].shape[0]
    _check_group(weights, (n_out, mid), "weight")
    _check_group(biases, (n_out,), "bias")
    device = weights[0].device
    out = buffers.allocate((n_groups, num_layers, 2, num_kv_heads, n_prefix, head_dim), weights[0].dtype, device)
    offsets, align = _offsets_table([weights, biases])
    plan = _with_alignment(plan_prefix_kv_forward(n_prefix, mid, n_out, head_dim, weights[0].dtype,
                                                  tiling._sm_count(device), blocks, groups=n_groups), align)
    tanh = _tanh_operand(torch.tanh(hidden.float()), plan.meta["DOT_PRECISION"])
    tiling.launch(_prefix_kv_fwd_kernel, plan, tanh, weights[0], biases[0], out, offsets,
                  n_groups, n_prefix, mid, n_out)
    return out


def grouped_prefix_kv_backward(grad_out: torch.Tensor, hidden: torch.Tensor, weights: Sequence[torch.Tensor],
                               bias_dtype: torch.dtype, blocks: Optional[PrefixKVBlocks] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dH, dW, db), each stacked over the groups ((G, p, mid), (G, N, mid), (G, N)), of
    :func:`grouped_prefix_kv_forward` from ``grad_out`` (G, layers, 2, kv_heads, p, head_dim).

    dH comes back in ``hidden.dtype``, dW in the weights' dtype, db in ``bias_dtype``.
    """
    grad_out, hidden = grad_out.contiguous(), hidden.contiguous()
    weights = [w.contiguous() for w in weights]
    n_groups, n_prefix, mid = hidden.shape
    n_out = weights[0].shape[0]
    _check_group(weights, (n_out, mid), "weight")
    head_dim = grad_out.shape[-1]
    device = weights[0].device
    weight_plan, hidden_plan, n_per_split = plan_prefix_kv_backward(
        n_prefix, mid, n_out, head_dim, grad_out.element_size(), weights[0].dtype, tiling._sm_count(device), blocks,
        groups=n_groups)
    tanh = torch.tanh(hidden.float())  # fp32 for the hidden gradient's 1 - T^2, which cancels near |T| = 1

    grad_weight = buffers.allocate((n_groups, n_out, mid), weights[0].dtype, device)
    grad_bias = buffers.allocate((n_groups, n_out), bias_dtype, device)
    tiling.launch(_prefix_kv_bwd_weight_kernel, weight_plan, grad_out,
                  _tanh_operand(tanh, weight_plan.meta["DOT_PRECISION"]), grad_weight, grad_bias,
                  n_prefix, mid, n_out)

    n_splits = triton.cdiv(n_out, n_per_split)
    partial = buffers.allocate((n_groups, n_splits, n_prefix, mid), torch.float32, device)
    offsets, align = _offsets_table([weights])
    tiling.launch(_prefix_kv_bwd_hidden_kernel, _with_alignment(hidden_plan, align), grad_out, tanh, weights[0],
                  partial, offsets, n_groups, n_prefix, mid, n_out, n_per_split, n_splits)
    grad_hidden = (partial[:, 0] if n_splits == 1 else partial.sum(1)).to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def prefix_kv_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                      num_kv_heads: int, head_dim: int, blocks: Optional[PrefixKVBlocks] = None) -> torch.Tensor:
    """``(tanh(hidden) @ weight.T + bias)`` in the (layers, 2, kv_heads, p, head_dim) layout: one group
    of :func:`grouped_prefix_kv_forward`.

    ``hidden`` (p, mid); ``weight`` (N, mid) with N = layers * 2 * kv_heads * head_dim; ``bias`` (N,).
    Inputs must already be validated, every size >= 1 (see ``dept_fast.ops.checks``).
    Returns ``weight.dtype``.
    """
    return grouped_prefix_kv_forward(hidden.unsqueeze(0), [weight], [bias], num_layers, num_kv_heads, head_dim,
                                     blocks)[0]


def prefix_kv_backward(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias_dtype: torch.dtype,
                       blocks: Optional[PrefixKVBlocks] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dH, dW, db) of :func:`prefix_kv_forward` from ``grad_out`` in the attention layout
    (one group of :func:`grouped_prefix_kv_backward`).

    dH comes back in ``hidden.dtype``, dW in ``weight.dtype``, db in ``bias_dtype``.
    """
    grads = grouped_prefix_kv_backward(grad_out.unsqueeze(0), hidden.unsqueeze(0), [weight], bias_dtype, blocks)
    return tuple(g[0] for g in grads)
