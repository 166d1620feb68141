"""DePT embedding stage ``[P ; E[ids] + scaling * (A @ B)[:L]]``: providers x modes x shapes.

Providers (bench/stage.py): eager = ``dept_embedding_reference`` (gather, matmul, add, cat);
compile = torch.compile of it; fused = ``dept_embedding(..., id_check="device")`` (no host sync), the Triton kernels
alone, as they run under torch.compile; module = ``dept_embedding(...)`` as
``FusedDePTEmbedding.forward`` calls it, with its id-range check (one host sync) — on CPU the
library's CPU path, i.e. the eager reference behind the checks. The embedding matrix is frozen
(as in DePT); P, A, B get gradients. Inputs are random, B included, so the update is really computed.
"""
import functools
import math
from dataclasses import dataclass

import pytest
import torch

from dept_fast import dept_embedding, dept_embedding_reference

from .stage import MODES, PROVIDERS, bench_stage, compiled, device_case, per_mode, skip_unless_available


@dataclass(frozen=True)
class StageCase:
    batch: int
    seq_len: int   # L, also the update's max_length s
    vocab: int
    dim: int
    prompt: int    # m
    rank: int      # r
    dtype: torch.dtype

    @property
    def out_shape(self):
        return (self.batch, self.prompt + self.seq_len, self.dim)

    def bytes_moved(self) -> dict:
        """Fewest bytes per mode: forward reads ids, b*L rows of E, P, A[:L], B and writes the output;
        backward reads G, A[:L], B and writes dP, dA, dB (E is frozen, so no dE)."""
        es = self.dtype.itemsize
        b, L, d, m, r = self.batch, self.seq_len, self.dim, self.prompt, self.rank
        params = (m * d + L * r + r * d) * es
        out = b * (m + L) * d * es
        forward = b * L * 8 + b * L * d * es + params + out
        backward = out + (L * r + r * d) * es + params
        return per_mode(forward, backward)


# The shapes of the benchmark protocol (shared/DESIGN.md); on CPU all in float32 (bench/stage.py).
CASES = {
    "t5-base-fp32": StageCase(32, 256, 32128, 768, 60, 30, torch.float32),
    "t5-base-bf16": StageCase(32, 256, 32128, 768, 60, 30, torch.bfloat16),
    "llama7b-b8-s2048": StageCase(8, 2048, 32000, 4096, 60, 16, torch.bfloat16),
    "llama7b-b64-s512": StageCase(64, 512, 32000, 4096, 60, 16, torch.bfloat16),
    "tiny-launch-bound": StageCase(2, 32, 1000, 128, 8, 4, torch.bfloat16),
}
FUNCTIONS = {"eager": dept_embedding_reference, "fused": functools.partial(dept_embedding, id_check="device"),
             "module": dept_embedding}


def make_inputs(case: StageCase, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device, dtype=case.dtype).requires_grad_(grad)

    return dict(input_ids=torch.randint(0, case.vocab, (case.batch, case.seq_len), generator=gen, device=device),
                weight=rand(case.vocab, case.dim), prompt=rand(case.prompt, case.dim, grad=True),
                lora_A=rand(case.seq_len, case.rank, grad=True), lora_B=rand(case.rank, case.dim, grad=True),
                scaling=8.0 / case.rank ** 0.5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_dept_stage(benchmark, device, copy_gbps, name, mode, provider):
    skip_unless_available(provider, device)
    case = device_case(name, CASES, device)
    inputs = make_inputs(case, device)
    fn = compiled(dept_embedding_reference) if provider == "compile" else FUNCTIONS[provider]
    bench_stage(benchmark, device, copy_gbps, kind="dept-stage", case=name, mode=mode, provider=provider,
                call=lambda: fn(**inputs), params=[inputs[k] for k in ("prompt", "lora_A", "lora_B")],
                bytes_moved=case.bytes_moved(), out_bytes=math.prod(case.out_shape) * case.dtype.itemsize,
                dtype=case.dtype,
                shape=f"b{case.batch} L{case.seq_len} d{case.dim} m{case.prompt} r{case.rank} V{case.vocab}")
