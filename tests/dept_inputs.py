"""Random inputs of the DePT op and its fp32 reference, shared by the op's CPU and GPU tests."""
import math

import torch

from dept_fast.ops import dept_embedding_reference

EMBED_SCALE = math.sqrt(40)
"""A model's embedding multiplier that is not 1 (6.32..., Gemma's / scaled BART's sqrt(d) at d = 40)."""


def make_inputs(shape, dtype, device, param_dtype=None, seed=0, embed_scale=1.0):
    """Random ids, E, P, A, B (P, A, B in ``param_dtype``, default ``dtype``), the scaling and the
    ``embed_scale`` (as given) of a shape (batch, L, max_length s, vocab V, d, prompt m, rank r)."""
    b, L, s, V, d, m, r = shape
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*size, dt):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dt)

    ids = torch.randint(0, V, (b, L), generator=gen).to(device)
    return dict(ids=ids, weight=rand(V, d, dt=dtype), prompt=rand(m, d, dt=param_dtype),
                lora_A=rand(s, r, dt=param_dtype), lora_B=rand(r, d, dt=param_dtype), scaling=8.0 / max(r, 1) ** 0.5,
                embed_scale=embed_scale)


def reference_fp32(inp, grad_out=None, emb_grad=False, padding_idx=None):
    """Reference output (and gradients of weight/prompt/A/B given grad_out) in fp32."""
    leaves = {k: inp[k].detach().float().requires_grad_(k != "weight" or emb_grad)
              for k in ("weight", "prompt", "lora_A", "lora_B")}
    out = dept_embedding_reference(inp["ids"], leaves["weight"], leaves["prompt"], leaves["lora_A"],
                                   leaves["lora_B"], inp["scaling"], padding_idx, embed_scale=inp["embed_scale"])
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out.float())
    # With r = 0 the reference never touches A/B (their grads stay None): the true gradient is 0.
    return out.detach(), {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
