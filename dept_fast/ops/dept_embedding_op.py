"""The DePT embedding stage as an op: validated, on the fused Triton kernels where they run.

``dept_embedding`` is the stage of the DePT paper, every token at its column:
``[P ; c * E[ids] + scaling * (A @ B)[:L]]``, c (``embed_scale``) what the model's embedding module
multiplies its rows by (1 for a plain ``nn.Embedding``). ``dept_embedding_at_positions`` lets each
token take the update row of its own position (left-padded rows, generation steps); it runs in
PyTorch.
"""
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .backend import TRITON_AVAILABLE, use_kernels
from .checks import check_dept_inputs, check_embed_scale, check_in_range, need
from .dept_embedding_reference import dept_embedding_mixed_reference, dept_embedding_reference

if TRITON_AVAILABLE:  # at import, not inside the Functions: torch.compile traces those
    from .. import kernels
    from ..kernels.adapter_rows import as_packs, scaling_of_packs, sort_rows


class DePTEmbeddingFunction(torch.autograd.Function):
    """``[P_a ; c * E[ids] + s_a * (A_a @ B_a)[:L]]`` in one kernel launch for the whole batch, gradients in
    one pass over G.

    Forward args: ids (b, L), weight E (V, d), then one adapter -- prompt P (m, d), lora_A (s, r),
    lora_B (r, d), a float scaling, rows None -- or k packed adapters (:func:`pack_adapters`) --
    prompts (k, M, d), lora_A (k, S, R), lora_B (k, R, d), scaling (k,) fp32, rows the
    ``AdapterRows`` of each row's adapter (``kernels.adapter_rows.sort_rows``); then deterministic,
    padding_idx and c = embed_scale (a float, default 1; the gradient of E carries it). The output
    has E's dtype; P, A, B may be kept in another float dtype (e.g. fp32 master weights beside a bf16
    model) and receive gradients in their own dtype. See ``kernels/dept_backward.py`` for the
    gradient math.

    Double backward (``create_graph=True``): the backward is linear in G, so it is then computed
    with differentiable PyTorch ops (the same math, G read more than once) and second-order
    gradients are exact.
    """

    @staticmethod
    def forward(ctx, ids, weight, prompt, lora_A, lora_B, scaling, rows, deterministic, padding_idx,
                embed_scale=1.0):
        out = kernels.dept_forward(ids, weight, prompt, lora_A, lora_B, scaling, rows, embed_scale=embed_scale)
        ctx.save_for_backward(ids, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.rows = rows
        ctx.deterministic = deterministic
        ctx.vocab = weight.shape[0]
        ctx.n_prompt = prompt.shape[-2]
        ctx.emb_dtype = weight.dtype
        ctx.prompt_dtype = prompt.dtype
        ctx.padding_idx = padding_idx
        ctx.embed_scale = embed_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, lora_A, lora_B = ctx.saved_tensors
        need_grad = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate
            grads = _differentiable_backward(ctx, grad_out, ids, lora_A, lora_B)
        else:
            grads = kernels.dept_backward(
                grad_out, ids, ctx.vocab, lora_A, lora_B, ctx.scaling, ctx.n_prompt, ctx.prompt_dtype,
                emb_dtype=ctx.emb_dtype if need_grad[1] else None, deterministic=ctx.deterministic, rows=ctx.rows,
                embed_scale=ctx.embed_scale)
        grad_emb, grad_prompt, grad_A, grad_B = grads
        if grad_emb is not None and ctx.padding_idx is not None:
            grad_emb[ctx.padding_idx] = 0  # as nn.Embedding: the padding row never learns
        return (None, grad_emb if need_grad[1] else None, grad_prompt if need_grad[2] else None,
                grad_A if need_grad[3] else None, grad_B if need_grad[4] else None, None, None, None, None, None)


def _differentiable_backward(ctx, grad_out, ids, lora_A, lora_B):
    """(dE, dP, dA, dB) as the kernels compute them, by autograd-traceable PyTorch ops (fp32 sums)."""
    m, seq_len = ctx.n_prompt, ids.shape[1]
    packed_A, packed_B = as_packs(lora_A, lora_B)
    grad = grad_out.float()
    if ctx.rows is None:
        col = grad.sum(0, keepdim=True)
    else:  # each adapter's rows summed: S_a = sum over rows i of adapter a of G[i]
        col = grad.new_zeros((packed_A.shape[0],) + grad.shape[1:]).index_add(0, ctx.rows.index, grad)
    scale, grad_in = scaling_of_packs(ctx.scaling), col[:, m:]
    grad_A = F.pad(scale * (grad_in @ packed_B.float().transpose(1, 2)), (0, 0, 0, packed_A.shape[1] - seq_len))
    grad_B = scale * (packed_A[:, :seq_len].float().transpose(1, 2) @ grad_in)
    grad_prompt = col[:, :m]
    if lora_A.dim() == 2:
        grad_prompt, grad_A, grad_B = grad_prompt[0], grad_A[0], grad_B[0]
    grad_emb = None
    if ctx.needs_input_grad[1]:
        grad_emb = torch.zeros((ctx.vocab, grad_out.shape[-1]), dtype=torch.float32, device=grad_out.device)
        grad_emb = grad_emb.index_add(0, ids.reshape(-1), grad[:, m:].reshape(-1, grad_out.shape[-1]))
        grad_emb = (grad_emb * ctx.embed_scale).to(ctx.emb_dtype)
    return grad_emb, grad_prompt.to(ctx.prompt_dtype), grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def dept_embedding(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   deterministic: Optional[bool] = None, id_check: str = "host",
                   padding_idx: Optional[int] = None, *, embed_scale: float = 1.0) -> torch.Tensor:
    """The DePT embedding stage, validated, on the fused kernels where they can run.

    Args:
        input_ids: (b, L) int64/int32 ids in [0, V); 1-D ids are refused (use ``unsqueeze(0)``).
        weight: (V, d) word embeddings; prompt: (m, d); lora_A: (s, r); lora_B: (r, d); L <= s.
        scaling: multiplier of A @ B (lora_alpha / sqrt(r)).
        deterministic: make the embedding gradient (only computed when ``weight`` requires grad)
            bit-reproducible; P, A, B gradients always are. Defaults to
            ``torch.are_deterministic_algorithms_enabled()``.
        id_check: how ids outside [0, V) are caught: ``"host"`` (a ValueError; one host
            synchronisation) or ``"device"`` (an asynchronous device-side assertion: no
            synchronisation, CUDA-graph capturable). The kernel never reads a bad id either way
            (its output row is NaN). Under torch.compile the device check is used.
        padding_idx: as ``nn.Embedding``: that row of E gets no gradient (when E is trainable).
        embed_scale: c, what the model's embedding module multiplies E's rows by (a float: 1 for a
            plain ``nn.Embedding``, sqrt(d) for Gemma or BART with ``scale_embedding``); the stage is
            ``[P ; c * E[ids] + scaling * (A @ B)[:L]]`` and E's gradient carries c.

    Returns:
        (b, m + L, d) tensor in ``weight.dtype``: each token's row computed in fp32 (c * E row +
        update) and rounded once, the prompt cast to E's dtype. ``meta`` tensors give a ``meta``
        result of that shape and dtype (no value is checked).
    """
    check_dept_inputs(input_ids, weight, prompt, lora_A, lora_B)
    need(input_ids.shape[1] <= lora_A.shape[0],
         f"input length {input_ids.shape[1]} exceeds max_length {lora_A.shape[0]} of the low-rank update; "
         "truncate the inputs or build the adapter with a larger max_length")
    embed_scale = check_embed_scale(embed_scale)
    check_in_range("input_ids", input_ids, weight.shape[0], "the vocabulary size", id_check)
    if not use_kernels(weight):
        return dept_embedding_reference(input_ids, weight, prompt, lora_A, lora_B, scaling, padding_idx,
                                        embed_scale=embed_scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return DePTEmbeddingFunction.apply(input_ids, weight, prompt, lora_A, lora_B, float(scaling), None,
                                       deterministic, padding_idx, embed_scale)


def dept_embedding_at_positions(input_ids: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                                prompt: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                                id_check: str = "host", padding_idx: Optional[int] = None, *,
                                embed_scale: float = 1.0) -> torch.Tensor:
    """The DePT stage where each token takes the update row of its own position:
    ``out[i] = [P ; c * E[ids[i, t]] + scaling * (A @ B)[positions[i, t]]]``, c = ``embed_scale``.

    With ``positions[i, t] = t`` this is :func:`dept_embedding`. Used for tokens whose position is not
    their column: left-padded rows (a token's index among its row's real tokens) and generation
    steps after the first. It runs as PyTorch ops (a gather of r-wide rows of A and one matmul),
    computed as the fused stage rounds: in fp32, cast once to E's dtype.

    Args:
        input_ids: (b, L) token ids; positions: (b, L) integer rows of A, each in [0, s).
        weight, prompt, lora_A, lora_B, scaling, id_check, padding_idx, embed_scale: as in
            :func:`dept_embedding` (``prompt[:0]`` embeds the tokens without the prompt).

    Returns:
        (b, m + L, d) in ``weight.dtype``.
    """
    return dept_embedding_mixed(input_ids, None, weight, [prompt], [lora_A], [lora_B], [scaling], positions=positions,
                                id_check=id_check, padding_idx=padding_idx, embed_scale=embed_scale)


class PackedAdapters(NamedTuple):
    """Several DePT adapters as one set of tensors (what the mixed stage reads): prompts (k, M, d)
    left-padded with zeros, lora_A (k, S, R) and lora_B (k, R, d) zero-padded, scaling (k,) fp32,
    and each adapter's own (m, s)."""

    prompts: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor
    sizes: Tuple[Tuple[int, int], ...]


def pack_adapters(prompts: Sequence[torch.Tensor], lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> PackedAdapters:
    """Stack adapters of any (m, s, r) into :class:`PackedAdapters` (differentiable: gradients reach
    each adapter's own tensors). One adapter packs as views, without a copy."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (*lora_As, *lora_Bs)])
    sizes = tuple((p.shape[0], a.shape[0]) for p, a in zip(prompts, lora_As))
    device = prompts[0].device
    # Filled on the device, not copied from a host list: no host synchronisation (generation steps
    # take this path once per token).
    scaling = torch.stack([torch.full((), float(s), dtype=torch.float32, device=device) for s in scalings])
    if len(prompts) == 1:
        return PackedAdapters(prompts[0][None], lora_As[0][None].to(dtype), lora_Bs[0][None].to(dtype), scaling, sizes)
    prompt_dtype = functools.reduce(torch.promote_types, [p.dtype for p in prompts])
    m, s, r = (max(t.shape[i] for t in ts) for ts, i in ((prompts, 0), (lora_As, 0), (lora_As, 1)))
    return PackedAdapters(
        torch.stack([F.pad(p.to(prompt_dtype), (0, 0, m - p.shape[0], 0)) for p in prompts]),
        torch.stack([F.pad(a.to(dtype), (0, r - a.shape[1], 0, s - a.shape[0])) for a in lora_As]),
        torch.stack([F.pad(b.to(dtype), (0, 0, 0, r - b.shape[0])) for b in lora_Bs]), scaling, sizes)


def dept_embedding_mixed(input_ids: torch.Tensor, adapter_index: Optional[torch.Tensor], weight: torch.Tensor,
                         prompts: Sequence[torch.Tensor], lora_As: Sequence[torch.Tensor],
                         lora_Bs: Sequence[torch.Tensor], scalings: Sequence[float],
                         positions: Optional[torch.Tensor] = None, id_check: str = "host",
                         padding_idx: Optional[int] = None, deterministic: Optional[bool] = None, *,
                         embed_scale: float = 1.0, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DePT stage with an adapter per batch row (mixed-task batches).

    Row i takes adapter ``a = adapter_index[i]`` of the k given (prompt (m_a, d), lora_A (s_a, r_a),
    lora_B (r_a, d), scaling): ``out[i] = [0 ; P_a ; c * E[ids[i]] + scaling_a * (A_a @ B_a)[pos]]``, the
    prompt left-padded with zero rows to the longest prompt M (a caller masks those slots), ``pos``
    the token's column or ``positions[i, t]``. ``adapter_index`` -1: no adapter (E[ids] after M
    zero rows); None: every row takes adapter 0. Each token's position must lie below its row's
    adapter's max_length. c = ``embed_scale`` (see :func:`dept_embedding`) is one for all adapters:
    they share E.

    Without ``positions`` it runs on the fused kernels where they can (one launch forward and one
    backward for the whole batch, each adapter's gradients summed from its own rows only,
    deterministically; ``deterministic`` as in :func:`dept_embedding`, for E's gradient); with them,
    in PyTorch. ``embeds`` (b, L, d): the rows the model's embedding module computed for ``input_ids``
    (a module with parameters of its own, e.g. LoRA on the embedding), used instead of ``c * E[ids]``
    (in PyTorch; their gradient flows back into that module).

    Returns:
        (b, M + L, d) in ``weight.dtype``, computed in fp32, rounded once.
    """
    k = len(prompts)
    need(k >= 1 and len(lora_As) == len(lora_Bs) == len(scalings) == k,
         "prompts, lora_As, lora_Bs and scalings must list the same adapters (at least one)")
    for prompt, lora_A, lora_B in zip(prompts, lora_As, lora_Bs):
        check_dept_inputs(input_ids, weight, prompt, lora_A, lora_B)
    embed_scale = check_embed_scale(embed_scale)
    batch, seq_len = input_ids.shape
    check_in_range("input_ids", input_ids, weight.shape[0], "the vocabulary size", id_check)
    packed = pack_adapters(prompts, lora_As, lora_Bs, scalings)
    if adapter_index is None:
        index = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    else:
        need(adapter_index.shape == (batch,) and not adapter_index.is_floating_point(),
             f"adapter_index must be a ({batch},) integer tensor, got {tuple(adapter_index.shape)} {adapter_index.dtype}")
        check_in_range("adapter_index", adapter_index, k, f"-1 (no adapter) or one of the {k} adapters", id_check,
                       low=-1)
        # -1 rows take a trailing all-zero adapter: no prompt, no update.
        packed = packed._replace(**{name: F.pad(getattr(packed, name), (0, 0) * (getattr(packed, name).dim() - 1) +
                                                (0, 1)) for name in ("prompts", "lora_A", "lora_B", "scaling")})
        index = torch.where(adapter_index < 0, k, adapter_index).long()
    if positions is None:
        shortest = min(s for _, s in packed.sizes)
        need(seq_len <= shortest, f"input length {seq_len} exceeds max_length {shortest} of a low-rank update in "
                                  "the batch; truncate the inputs or build the adapter with a larger max_length")
        if use_kernels(weight) and embeds is None:
            if deterministic is None:
                deterministic = torch.are_deterministic_algorithms_enabled()
            if adapter_index is None:  # adapter 0 alone (its prompt padded to M)
                return DePTEmbeddingFunction.apply(input_ids, weight, packed.prompts[0], packed.lora_A[0],
                                                   packed.lora_B[0], float(scalings[0]), None, deterministic,
                                                   padding_idx, embed_scale)
            return DePTEmbeddingFunction.apply(input_ids, weight, packed.prompts, packed.lora_A, packed.lora_B,
                                               packed.scaling, sort_rows(index, k + 1), deterministic, padding_idx,
                                               embed_scale)
    else:
        need(positions.shape == input_ids.shape,
             f"positions must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(positions.shape)}")
        sizes = [s for _, s in packed.sizes] + [packed.lora_A.shape[1]]  # the no-adapter row: any position
        limit = sizes[0] if adapter_index is None else torch.tensor(sizes, device=input_ids.device)[index, None]
        check_in_range("token positions", positions, limit,
                       "the rows of the row's DePT update, its max_length; positions count a row's real tokens, "
                       "generated ones included: shorten the input or max_new_tokens, or build the adapter with a "
                       "larger max_length", id_check)
    if embeds is not None:
        need(embeds.shape == input_ids.shape + (weight.shape[1],),
             f"embeds must be (b, L, d) = {tuple(input_ids.shape) + (weight.shape[1],)}, got {tuple(embeds.shape)}")
    return dept_embedding_mixed_reference(input_ids, index, weight, packed.prompts, packed.lora_A, packed.lora_B,
                                          packed.scaling, positions, padding_idx, embed_scale=embed_scale,
                                          embeds=embeds)
