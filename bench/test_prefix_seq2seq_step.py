"""One training step of Prefix-Tuning on BART-base: dept_fast's three prefixes (Li & Liang: encoder,
decoder and cross-attention, each from its own MLP), dept_fast with the decoder's self-attention prefix
only (PEFT's placement), and PEFT's ``SEQ_2_SEQ_LM`` prefix route (a pre-filled ``past_key_values``
cache on the decoder's self-attention).

All build the prefixes with a reparameterization MLP of width mid; the base model is frozen. Methods:
``dept_fast`` (three prefixes), ``dept_fast-decoder``, ``peft``. Shape on CUDA: BART-base (6+6 layers,
d 768), b 16, source 512, summary 64, p 100, mid 512, bf16 (scaled down on CPU).
"""
import pytest
import torch

from dept_fast import apply_prefix_tuning

from .measure import measure
from .models import BART_CASE as CASE
from .models import StepRun, build_model, prefix_step_info, train_step

METHODS = ["dept_fast", "dept_fast-decoder", "peft"]
BASELINE = {"dept_fast": "peft", "dept_fast-decoder": "peft"}


def step_runner(method: str, device: torch.device) -> StepRun:
    model = build_model(CASE, device)
    if method == "peft":
        peft = pytest.importorskip("peft")
        config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=CASE.prefix_len,
                                         prefix_projection=True, encoder_hidden_size=CASE.prefix_mid)
        model = peft.get_peft_model(model, config)
    else:
        attentions = ("decoder",) if method == "dept_fast-decoder" else None
        model = apply_prefix_tuning(model, CASE.prefix_len, projection_dim=CASE.prefix_mid, attentions=attentions)
    return train_step(model, CASE, device)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_seq2seq_step(benchmark, device, method):
    benchmark.group = "prefix-seq2seq-step"
    run = step_runner(method, device)
    info = prefix_step_info("prefix-seq2seq-step", "bart-base", method, BASELINE.get(method), CASE, run, "BART_CASE")
    measure(benchmark, run.step, device, info, grad_to_none=run.params, warmup_ms=100, rep_ms=500)
