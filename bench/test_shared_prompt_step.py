"""One training step of a Llama-shaped decoder: DePT's prompt shared (run once per batch, its K/V
attended to by every row) vs the prompt in every row vs no prompt at all.

Methods (one base model per record, frozen; forward + backward of the loss):
    no-prompt   the base model on the inputs alone, the input embeddings a leaf that requires grad
                (so the backward runs through every layer, as with a prompt): the cost floor
    every-row   ``apply_dept(..., share_prompt=False)``: b x (m + L) tokens through every layer
    shared      ``apply_dept(..., share_prompt=True)``: one (1, m) prompt pass + b x L tokens
The targets (H100): shared within 1.1x of no-prompt, and >= 1.3x faster than every-row at
L 256, m 100. On CPU the model and shapes are scaled down (still large enough that compute, not
Python, dominates a step) and only the ratios mean anything.
"""
import pytest
import torch
from torch import nn

from dept_fast import apply_dept

from .measure import measure
from .models import StepRun, build_model, decoder_case, make_batch, model_step

METHODS = ["no-prompt", "every-row", "shared"]
BASELINE = {"every-row": "no-prompt", "shared": "every-row"}  # what each method is compared with
# (L, m, r) on CUDA; on CPU each shrinks by 4.
SIZES = [(256, 100, 0), (256, 60, 30), (1024, 100, 0), (1024, 60, 30)]
CASES = {f"L{length}-m{prompt}-r{rank}": decoder_case(length, prompt, rank) for length, prompt, rank in SIZES}


def step_runner(method: str, case, device: torch.device) -> StepRun:
    model = build_model(case, device)
    batch = make_batch(case, device)
    if method == "no-prompt":
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()

        def step():
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        return StepRun(step, [embeds])
    model = apply_dept(model, case.dept_prompt, case.dept_rank, case.seq_len, share_prompt=method == "shared").train()
    if case.dept_rank:
        nn.init.normal_(model.dept.lora_B, std=0.02)  # not the zero init: the update is really computed
    return StepRun(model_step(model, batch), [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CASES)
def test_shared_prompt_step(benchmark, device, name, method):
    case = CASES[name]
    benchmark.group = f"shared-prompt-step {name}"
    run = step_runner(method, case, device)
    info = dict(kind="shared-prompt-step", model=name, method=method, baseline=BASELINE.get(method),
                shape=case.shape(f"DePT m{case.dept_prompt} r{case.dept_rank}"),
                trainable=run.trainable if method != "no-prompt" else 0,
                note="shared-prompt-step on CPU uses a scaled-down model (4 layers d 256) and L, m, r / 4"
                     if case.scaled else None)
    measure(benchmark, run.step, device, info, grad_to_none=run.params, warmup_ms=100, rep_ms=500)
