"""One training step of a whole model (forward + backward of the loss, base frozen), per adapter.

Compares vanilla prompt tuning (PT, l tokens, eager) with DePT (m tokens + rank-r update) eager
and fused, DePT through ``apply_dept`` (sharing off), and Prefix-Tuning: step time, peak extra
memory, and for the embedding-stage methods the stage's own forward+backward time, which shows
how small a part of a step the stage is. Shapes: bench/models.py (scaled down on CPU).
"""
import pytest
import torch

from .measure import measure, time_ms
from .models import METHODS, MODEL_CASES, unavailable, step_runner


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODEL_CASES)
def test_model_step(benchmark, device, name, method):
    reason = unavailable(method, device)
    if reason:
        pytest.skip(reason)
    case = MODEL_CASES[name]
    benchmark.group = f"model-step {name}"
    run = step_runner(method, case, device)
    stage_ms = None
    if run.stage is not None:
        ids = torch.randint(3, case.config["vocab_size"], (case.batch, case.seq_len), device=device)
        grad = torch.randn(case.batch, run.stage_tokens + case.seq_len, case.hidden, device=device, dtype=case.dtype)
        stage_ms = time_ms(lambda: run.stage(ids).backward(grad), device, grad_to_none=run.params)
    info = dict(kind="model-step", model=name, method=method, baseline="pt-eager", shape=case.shape(),
                trainable=run.trainable, stage_ms=stage_ms,
                note="model-step on CPU uses scaled-down shapes (bench/models.py CPU_CASES)" if case.scaled else None)
    measure(benchmark, run.step, device, info, grad_to_none=run.params, warmup_ms=100, rep_ms=500)
