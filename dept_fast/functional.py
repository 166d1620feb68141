"""The DePT embedding stage as an autograd Function over the fused Triton kernels."""
from typing import Optional

import torch

from ._checks import check_dept_inputs
from .backend import TRITON_AVAILABLE, use_kernels
from .reference import dept_embedding_reference

if TRITON_AVAILABLE:
    from . import kernels


class DePTEmbeddingFunction(torch.autograd.Function):
    """``[P ; E[ids] + scaling * (A @ B)[:L]]`` in one kernel launch, gradients in one pass over G.

    Forward args: ids (b, L), weight E (V, d), prompt P (m, d), lora_A (s, r), lora_B (r, d),
    scaling, deterministic. The output has E's dtype; P, A, B may be kept in another float dtype
    (e.g. fp32 master weights beside a bf16 model) and receive gradients in their own dtype.
    See ``kernels/dept_backward.py`` for the gradient math.
    """

    @staticmethod
    def forward(ctx, ids, weight, prompt, lora_A, lora_B, scaling, deterministic, padding_idx):
        out = kernels.dept_forward(ids, weight, prompt, lora_A, lora_B, scaling)
        ctx.save_for_backward(ids, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.deterministic = deterministic
        ctx.vocab = weight.shape[0]
        ctx.n_prompt = prompt.shape[0]
        ctx.emb_dtype = weight.dtype
        ctx.prompt_dtype = prompt.dtype
        ctx.padding_idx = padding_idx
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, lora_A, lora_B = ctx.saved_tensors
        grad_emb, grad_prompt, grad_A, grad_B = kernels.dept_backward(
            grad_out, ids, ctx.vocab, lora_A, lora_B, ctx.scaling, ctx.n_prompt, ctx.prompt_dtype,
            emb_dtype=ctx.emb_dtype if ctx.needs_input_grad[1] else None,
            deterministic=ctx.deterministic,
        )
        if grad_emb is not None and ctx.padding_idx is not None:
            grad_emb[ctx.padding_idx] = 0  # as nn.Embedding: the padding row never learns
        need = ctx.needs_input_grad
        return (None, grad_emb, grad_prompt if need[2] else None, grad_A if need[3] else None,
                grad_B if need[4] else None, None, None, None)


def dept_embedding(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   deterministic: Optional[bool] = None, check_ids: bool = True,
                   padding_idx: Optional[int] = None) -> torch.Tensor:
    """The DePT embedding stage, validated, on the fused kernels where they can run.

    Args:
        input_ids: (b, L) int64/int32 ids in [0, V); 1-D ids are refused (use ``unsqueeze(0)``).
        weight: (V, d) word embeddings; prompt: (m, d); lora_A: (s, r); lora_B: (r, d); L <= s.
        scaling: multiplier of A @ B (lora_alpha / sqrt(r)).
        deterministic: make the embedding gradient (only computed when ``weight`` requires grad)
            bit-reproducible; P, A, B gradients always are. Defaults to
            ``torch.are_deterministic_algorithms_enabled()``.
        check_ids: verify ids lie in [0, V) (one host sync; skipped under torch.compile).
        padding_idx: as ``nn.Embedding``: that row of E gets no gradient (when E is trainable).

    Returns:
        (b, m + L, d) tensor in ``weight.dtype``.
    """
    check_dept_inputs(input_ids, weight, prompt, lora_A, lora_B, check_ids=check_ids)
    if not use_kernels(weight):
        return dept_embedding_reference(input_ids, weight, prompt, lora_A, lora_B, scaling, padding_idx)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return DePTEmbeddingFunction.apply(input_ids, weight, prompt, lora_A, lora_B, float(scaling), deterministic,
                                        padding_idx)
