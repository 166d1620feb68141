"""The whole model on the prefix attention: a training step and ``generate()`` of 64 tokens of the
8-layer decoder at L 1024 and 2048, with no prompt and with each way of adding one.

Methods (LLAMA_8L in bf16 on CUDA, b 8, no padding, base frozen):
    no-prompt   the plain model; in training its input embeddings are a leaf that requires grad, so
                the backward runs through every layer, as with a prompt: the cost floor
    shared      ``apply_dept`` (m 60, r 30), the shared prompt: one (1, m) prompt pass, then b x L
                tokens attending to its keys/values through the prefix attention (mask-free)
    prefix      ``apply_prefix_tuning`` (p 60, MLP 512): b x L tokens, p prefix keys per layer
    peft-pt     PEFT prompt tuning (60 virtual tokens): b x (60 + L) tokens through every layer
Modes: ``train-step`` (forward + backward of the loss) and ``generate`` (64 new tokens, greedy, no
gradients; a warm-up and 2 host-timed calls). Every record names the sdpa kernels one call ran
(``sdpa``: flash, efficient, cudnn, math; counted from the aten ops of one extra call). Target
(H100): the shared-prompt training step within 1.1x of no-prompt's at the same L (RESULTS.md
judges it). On CPU the decoder is scaled down (4 layers d 256), L, m, p and the tokens are divided
by 4, the batch is 2: a smoke run, whose ratios alone mean anything.
"""
import pytest
import torch
from torch import nn

from dept_fast import apply_dept, apply_prefix_tuning

from .measure import measure, sdpa_kernels
from .models import SHRINK, build_model, decoder_case, make_batch

METHODS = ["no-prompt", "shared", "prefix", "peft-pt"]
PROMPT = 60  # m, p, PEFT's virtual tokens (CUDA)
NEW_TOKENS = 64 // SHRINK
CASES = {f"L{length}": decoder_case(length, PROMPT, 30, batch=None if torch.cuda.is_available() else 2)
         for length in (1024, 2048)}


def adapted(method: str, case, device: torch.device) -> nn.Module:
    """The base decoder with ``method``'s prompt (B drawn, not zero: the update is really computed)."""
    model = build_model(case, device)
    if method == "shared":
        model = apply_dept(model, case.dept_prompt, case.dept_rank, case.seq_len + NEW_TOKENS)
        nn.init.normal_(model.dept.lora_B, std=0.02)
    elif method == "prefix":
        model = apply_prefix_tuning(model, case.dept_prompt, projection_dim=case.prefix_mid)
    elif method == "peft-pt":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=case.dept_prompt))
    model.generation_config.eos_token_id = None
    return model


def runner(method: str, mode: str, model: nn.Module, batch: dict):
    """One call of ``mode`` and the tensors whose ``.grad`` it fills."""
    if mode == "generate":
        def generate():
            with torch.no_grad():
                model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        return generate, []
    if method == "no-prompt":
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()

        def plain_step():
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        return plain_step, [embeds]

    def step():
        model(**batch).loss.backward()
    return step, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["train-step", "generate"])
@pytest.mark.parametrize("name", CASES)
def test_attention_step(benchmark, device, name, mode, method):
    case = CASES[name]
    model = adapted(method, case, device)
    model.train() if mode == "train-step" else model.eval()
    batch = make_batch(case, device)
    run, params = runner(method, mode, model, batch)
    benchmark.group = f"attention-step {name} {mode}"
    shape = case.shape(f"m = p = {case.dept_prompt}, DePT r {case.dept_rank}" +
                       (f", {NEW_TOKENS} new tokens" if mode == "generate" else ""))
    info = dict(kind="attention-step", model=f"{name} {mode}", method=method,
                baseline=None if method == "no-prompt" else "no-prompt", shape=shape,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                sdpa=sdpa_kernels(run),
                note=f"attention-step on CPU: 4 layers d 256, b {case.batch}, L, m, p and tokens / {SHRINK}"
                if case.scaled else None)
    if mode == "train-step":
        measure(benchmark, run, device, info, grad_to_none=params, warmup_ms=100, rep_ms=300)
    else:
        measure(benchmark, run, device, info, rounds=2)
