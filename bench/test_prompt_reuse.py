"""What the shared prompt's reuse scopes save at inference: the prompt pass once per call (the
default) vs once for all calls inside ``dept_fast.serving(model)``.

The decoder of the shared-prompt suite (8 layers d 2048 bf16 on CUDA; scaled down on CPU), DePT m 60
r 30, batch 8 of L 256, no gradients, eval mode. Modes: one scoring call (a forward) and
``generate()`` of 64 tokens (one prompt pass per call by default, reused by its steps). On CPU L, m,
r and the tokens are divided by 4.
"""
import pytest
import torch
from torch import nn

from dept_fast import apply_dept, serving

from .measure import measure
from .models import SHRINK, build_model, decoder_case, make_batch

NEW_TOKENS = 64 // SHRINK
CASE = decoder_case(256, 60, 30)


@pytest.mark.parametrize("method", ["per-call", "serving"])
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_prompt_reuse(benchmark, device, mode, method):
    model = apply_dept(build_model(CASE, device), CASE.dept_prompt, CASE.dept_rank, CASE.seq_len + NEW_TOKENS).eval()
    nn.init.normal_(model.dept.lora_B, std=0.02)
    model.generation_config.eos_token_id = None
    batch = make_batch(CASE, device)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def score():
        with torch.no_grad():
            model(**inputs)

    def generate():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    benchmark.group = f"prompt-reuse {mode}"
    info = dict(kind="prompt-reuse-step", model=mode, method=method, baseline="per-call" if method == "serving" else None,
                shape=CASE.shape(f"DePT m{CASE.dept_prompt} r{CASE.dept_rank}, shared prompt, no gradients" +
                                 (f", {NEW_TOKENS} new tokens" if mode == "generate" else "")),
                trainable=0, note="prompt-reuse on CPU: 4 layers d 256, L, m, r and tokens / 4" if CASE.scaled else None)
    with serving(model) if method == "serving" else torch.no_grad():
        if mode == "score":
            measure(benchmark, score, device, info, warmup_ms=100, rep_ms=300)
        else:
            measure(benchmark, generate, device, info, rounds=3)
