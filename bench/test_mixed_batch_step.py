"""Mixed-task batches: one frozen decoder, k DePT adapters, a batch whose rows name different ones.

Methods (the 8-layer d 2048 decoder in bf16 on CUDA; 16 adapters, m 60, r 30; batch 32, L 256,
every adapter 2 rows; shared prompt, the default on decoders):
    single        every row takes one adapter: the cost floor of a batch of this size
    mixed         ``adapter_names=[...]``: one pass of the base model, each row its own adapter
    per-adapter   PEFT's way: one call per adapter over its rows (k calls of b / k rows)
Modes: a training step (forward + backward of the loss; CUDA-event timed) and ``generate()`` of 64
tokens (greedy; a warm-up and 3 calls on the host clock, synchronised).
Targets (H100): mixed within 1.15x of single, and >= 3x faster than per-adapter. On CPU the model,
the adapter count (4), batch (8), L, m, r and the tokens generated are scaled down; only the ratios
mean anything there.
"""
from typing import Callable, List

import pytest
import torch
from torch import nn

from dept_fast import apply_dept

from .measure import measure
from .models import SHRINK, build_model, decoder_case, make_batch

METHODS = ["single", "mixed", "per-adapter"]
BASELINE = {"mixed": "single", "per-adapter": "mixed"}
ADAPTERS = 16 // SHRINK
NEW_TOKENS = 64 // SHRINK
CASE = decoder_case(256, 60, 30, batch=32 // SHRINK)


def mixed_model(device: torch.device) -> nn.Module:
    """The base decoder with :data:`ADAPTERS` DePT adapters ``task0``, ``task1``, ... (B not zero)."""
    model = build_model(CASE, device)
    for i in range(ADAPTERS):
        apply_dept(model, CASE.dept_prompt, CASE.dept_rank, CASE.seq_len + NEW_TOKENS, adapter_name=f"task{i}")
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.02)
    return model


def row_names(method: str) -> List[str]:
    """Each row's adapter: all the first one (single), or every adapter on b / k rows."""
    return ["task0" if method == "single" else f"task{i % ADAPTERS}" for i in range(CASE.batch)]


def calls(method: str, batch: dict) -> List[tuple]:
    """(batch rows, their adapter names) of each call a method makes."""
    names = row_names(method)
    if method != "per-adapter":
        return [(batch, names)]
    groups = []
    for i in range(ADAPTERS):
        rows = torch.tensor([j for j, name in enumerate(names) if name == f"task{i}"], device=batch["input_ids"].device)
        groups.append(({k: v[rows] for k, v in batch.items()}, [f"task{i}"] * len(rows)))
    return groups


def runner(method: str, mode: str, model: nn.Module, batch: dict) -> Callable[[], None]:
    parts = calls(method, batch)
    if mode == "train-step":
        def run():
            for part, names in parts:
                model(**part, adapter_names=names).loss.backward()
        return run

    def generate():
        with torch.no_grad():
            for part, names in parts:
                model.generate(input_ids=part["input_ids"], attention_mask=part["attention_mask"], adapter_names=names,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return generate


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["train-step", "generate"])
def test_mixed_batch(benchmark, device, mode, method):
    model = mixed_model(device)
    model.train() if mode == "train-step" else model.eval()
    model.generation_config.eos_token_id = None
    batch = make_batch(CASE, device)
    benchmark.group = f"mixed-batch {mode}"
    params = [p for p in model.parameters() if p.requires_grad]
    shape = CASE.shape(f"{ADAPTERS} DePT adapters m{CASE.dept_prompt} r{CASE.dept_rank}, {CASE.batch // ADAPTERS} rows "
                       f"each" + (f", {NEW_TOKENS} new tokens" if mode == "generate" else ""))
    info = dict(kind="mixed-batch-step", model=mode, method=method, baseline=BASELINE.get(method), shape=shape,
                trainable=sum(p.numel() for p in params),
                note=f"mixed-batch on CPU: 4 layers d 256, {ADAPTERS} adapters, b {CASE.batch}, L, m, r and tokens / 4"
                if CASE.scaled else None)
    if mode == "train-step":
        measure(benchmark, runner(method, mode, model, batch), device, info, grad_to_none=params, warmup_ms=100,
                rep_ms=500)
    else:  # seconds per call (per-adapter: k generate() calls): a warm-up and 3 host-timed calls
        measure(benchmark, runner(method, mode, model, batch), device, info, rounds=3)
