"""One training step of Prefix-Tuning on a Llama-shaped decoder: dept_fast's prefix attention route
vs PEFT's ``past_key_values`` route, with and without gradient checkpointing.

Both build the prefixes with a reparameterization MLP of width mid (Embedding(p, e) -> Linear(e, mid)
-> tanh -> Linear(mid, layers * 2 * kv_heads * head_dim)): e is the hidden size d for us (as Li &
Liang), PEFT's token_dim (kv_heads * head_dim) for PEFT, hence the different trainable counts under
grouped-query attention; the MLP is a negligible part of a step. The base model is frozen. Methods:
``dept_fast``, ``peft``, and each with ``+ckpt`` (``enable_activation_checkpointing(model, use_reentrant=False)``).
PEFT's cache route does not survive checkpointing in training (transformers drops the cache); when
its step raises, that record is skipped with the error as the reason. Shape on CUDA: LLAMA_8L,
b 8, L 1024, p 64, bf16 (scaled down on CPU).
"""
import dataclasses

import pytest
import torch

from dept_fast import apply_prefix_tuning, enable_activation_checkpointing

from .measure import measure
from .models import MODEL_CASES, StepRun, build_model, prefix_step_info, train_step

_DECODER = MODEL_CASES["llama-decoder"]
CASE = dataclasses.replace(_DECODER, prefix_len=_DECODER.prefix_len * 64 // 100)  # p 64 on CUDA
METHODS = ["dept_fast", "peft", "dept_fast+ckpt", "peft+ckpt"]
BASELINE = {"dept_fast": "peft", "dept_fast+ckpt": "peft+ckpt"}


def step_runner(method: str, device: torch.device) -> StepRun:
    model = build_model(CASE, device)
    if method.startswith("peft"):
        peft = pytest.importorskip("peft")
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=CASE.prefix_len,
                                         prefix_projection=True, encoder_hidden_size=CASE.prefix_mid)
        model = peft.get_peft_model(model, config)
    else:
        model = apply_prefix_tuning(model, CASE.prefix_len, projection_dim=CASE.prefix_mid)
    if method.endswith("+ckpt"):
        enable_activation_checkpointing(model, use_reentrant=False)
    return train_step(model, CASE, device)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_peft_step(benchmark, device, method):
    benchmark.group = "prefix-peft-step"
    run = step_runner(method, device)
    try:
        run.step()
    except RuntimeError as error:
        pytest.skip(f"{method} fails its training step: {type(error).__name__}: {str(error)[:200]}")
    info = prefix_step_info("prefix-peft-step", "llama-decoder", method, BASELINE.get(method), CASE, run, "CPU_CASES")
    measure(benchmark, run.step, device, info, grad_to_none=run.params, warmup_ms=100, rep_ms=500)
