"""apply_dept on CUDA: the fused kernels inside real models (fp32 and bf16), left-padded generate.

Tolerances: fp32 on the GPU may use TF32 in the model's matmuls (10-bit mantissa), so fp32
outputs are held to 2e-3 relative; bf16 models to 2e-2 (a few bf16 ulps through two layers).
"""
import pytest
import torch

from decoding import greedy_without_cache
from dept_fast import dept_embedding_reference
from dept_models import FAMILY_ROUTES, M, dept_model, padded_batch
from families import build
from numerics import rel_err
from tiny_models import VOCAB

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
@FAMILY_ROUTES
def test_cuda_forward_matches_eager_composition(family, share, dtype, tol):
    model, base = dept_model(family, share=share).to("cuda", dtype), build(family).to("cuda", dtype)
    ids, mask = (t.cuda() for t in padded_batch([7, 7], 7, "right"))
    extra = {"decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {}
    got = model(input_ids=ids, attention_mask=mask, **extra).logits
    d = model.dept
    embeds = dept_embedding_reference(ids, d.weight, d.prompt, d.lora_A, d.lora_B, d.scaling)
    ones = torch.ones(2, M, dtype=mask.dtype, device="cuda")
    want = base(inputs_embeds=embeds, attention_mask=torch.cat([ones, mask], 1), **extra).logits
    if d.share_prompt:
        want = want[:, M:]
    assert rel_err(got.float(), want.float()) <= tol


@FAMILY_ROUTES
def test_cuda_generate_matches_full_recompute(family, share):
    model = dept_model(family, share=share).cuda()
    side = "right" if model.config.is_encoder_decoder else "left"
    ids, mask = (t.cuda() for t in padded_batch([5, 3], 5, side))
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        want = greedy_without_cache(model, ids, mask, 5)
    assert torch.equal(tokens if side == "right" else tokens[:, -5:], want.to(tokens.device))
    assert tokens.max() < VOCAB
