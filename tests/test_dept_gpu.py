"""CUDA-only checks of the fused DePT kernels: real bf16, tl.dot at small ranks, int64 offsets,
determinism across runs, and torch.compile(fullgraph=True). Skipped without a GPU; run them
with `bash bench/gpu_session.sh` (or `pytest tests -m gpu`) on a CUDA machine."""
import pytest
import torch
from torch import nn

from dept_fast import FusedDePTEmbedding, dept_embedding
from dept_fast.kernels import dept_backward, dept_forward
from dept_inputs import EMBED_SCALE, make_inputs, reference_fp32
from numerics import TOL, rel_err

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("rank", [1, 5, 16, 30])
def test_bf16_llama_like_shapes(rank, poison):
    """bf16 end to end with the GPU's tile heuristic (batch groups > 1), d = 4096 and ranks that
    need padding of tl.dot's K dimension to 16/32."""
    inp = make_inputs((8, 500, 512, 32000, 4096, 60, rank), torch.bfloat16, CUDA)
    params = {k: inp[k].requires_grad_() for k in ("prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], inp["weight"], **params, scaling=inp["scaling"])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref = reference_fp32(inp, grad_out)
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16]
    for name, p in params.items():
        assert rel_err(p.grad, ref[name]) <= TOL[torch.bfloat16], name


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-scatter", "deterministic"])
def test_bf16_embed_scale_with_trainable_embeddings(deterministic, poison):
    """A model's embedding multiplier c != 1 on the GPU's plans (tf32 update tile, pipelined backward
    with the scaled dE scatter, or the sort-based dE in fp32): output and every gradient, dE included."""
    inp = make_inputs((8, 500, 512, 32000, 4096, 60, 16), torch.bfloat16, CUDA, embed_scale=EMBED_SCALE)
    params = {k: inp[k].requires_grad_() for k in ("weight", "prompt", "lora_A", "lora_B")}
    out = dept_embedding(inp["ids"], **params, scaling=inp["scaling"], deterministic=deterministic,
                         embed_scale=EMBED_SCALE)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref = reference_fp32(inp, grad_out, emb_grad=True)
    assert rel_err(out, ref_out) <= TOL[torch.bfloat16]
    for name, p in params.items():
        assert rel_err(p.grad, ref[name]) <= TOL[torch.bfloat16], name


def test_int64_offsets_vocab_times_dim_over_2_31(poison):
    """E with V*d > 2**31 elements: ids near the end of the vocabulary address past 2**31."""
    V, d = 2 ** 31 // 1024 + 4096, 1024
    weight = torch.randn(V, d, device=CUDA, dtype=torch.bfloat16)
    ids = torch.randint(V - 5000, V, (4, 64), device=CUDA)
    ids[:, :8] = torch.randint(0, 100, (4, 8), device=CUDA)
    prompt, A, B = (torch.randn(*s, device=CUDA, dtype=torch.bfloat16) for s in ((3, d), (64, 8), (8, d)))
    out = dept_embedding(ids, weight, prompt, A, B, 2.0)
    ref = torch.cat([prompt.float().expand(4, -1, -1), weight[ids].float() + 2.0 * (A.float() @ B.float())], 1)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    weight.requires_grad_()
    grad = torch.randn_like(out)
    grad_emb, *_ = dept_backward(grad, ids, V, A, B, 2.0, 3, torch.bfloat16, emb_dtype=torch.bfloat16)
    rows = ids.unique()
    ref_rows = torch.zeros(V, d, device=CUDA).index_add_(0, ids.flatten(), grad[:, 3:].reshape(-1, d).float())[rows]
    assert rel_err(grad_emb[rows], ref_rows) <= TOL[torch.bfloat16]


def test_int64_offsets_output_over_2_31(poison):
    """Output with b*(m+L)*d > 2**31 elements: the last batch rows are written past 2**31."""
    b, L, d = 1040, 500, 4096  # b * (12 + 500) * d > 2**31
    inp = make_inputs((b, L, 512, 1000, d, 12, 4), torch.bfloat16, CUDA)
    out = dept_forward(inp["ids"], inp["weight"], inp["prompt"], inp["lora_A"], inp["lora_B"], inp["scaling"])
    last = {k: (v[-2:] if k == "ids" else v) for k, v in inp.items()}
    ref_last, _ = reference_fp32(last)
    assert rel_err(out[-2:], ref_last) <= TOL[torch.bfloat16]
    _, grad_prompt, _, _ = dept_backward(torch.ones_like(out), inp["ids"], 1000, inp["lora_A"], inp["lora_B"],
                                         inp["scaling"], 12, torch.float32, emb_dtype=None)
    assert torch.all(grad_prompt == b)


def test_gradients_bitwise_deterministic_across_runs():
    """dP, dA, dB never use atomics; dE is reproducible with deterministic=True."""
    inp = make_inputs((64, 256, 256, 32128, 768, 60, 30), torch.bfloat16, CUDA)
    weight = inp["weight"].requires_grad_()
    grad_out = None
    runs = []
    for _ in range(2):
        leaves = [inp[k].detach().requires_grad_() for k in ("prompt", "lora_A", "lora_B")]
        out = dept_embedding(inp["ids"], weight, *leaves, inp["scaling"], deterministic=True)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator(CUDA).manual_seed(0), device=CUDA,
                                   dtype=out.dtype)
        weight.grad = None
        out.backward(grad_out)
        runs.append([p.grad for p in leaves] + [weight.grad])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("id_check, embed_scale", [("host", 1.0), ("device", 1.0), ("device", EMBED_SCALE)])
def test_torch_compile_fullgraph_matches_eager(id_check, embed_scale):
    """Forward + backward of the module compiled whole; under compile the id check is the device one."""
    torch.manual_seed(0)
    mod = FusedDePTEmbedding(nn.Embedding(32128, 768).to(CUDA, torch.bfloat16), 60, 30, 256, id_check=id_check,
                             embed_scale=embed_scale)
    nn.init.normal_(mod.lora_B)
    ids = torch.randint(0, 32128, (8, 200), device=CUDA)
    grads = []
    for fn in (mod, torch.compile(mod, fullgraph=True)):
        for p in (mod.prompt, mod.lora_A, mod.lora_B):
            p.grad = None
        out = fn(ids)
        out.float().square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in (mod.prompt, mod.lora_A, mod.lora_B)]))
    (eager_out, eager_grads), (comp_out, comp_grads) = grads
    assert torch.equal(eager_out, comp_out)
    for e, c in zip(eager_grads, comp_grads):
        assert rel_err(c, e) <= TOL[torch.bfloat16]
