"""Prefix-Tuning encoder stage: every layer's prefix K/V from the reparameterization MLP,
Embedding(p, e) -> Linear(e, mid) -> tanh -> Linear(mid, layers*2*kv_heads*head_dim) -> attention
layout (layers, 2, kv_heads, p, head_dim). Providers x modes x shapes, all five MLP tensors trained.

Providers (bench/stage.py): eager = ``F.linear`` then ``prefix_kv_reference`` (tanh, linear, permute,
contiguous); compile = torch.compile of it; fused = ``FusedPrefixEncoder.forward`` (cuBLAS first
Linear, then one Triton kernel for tanh + second Linear + layout); module = the same call on CPU,
where it runs the reference (on CUDA it is ``fused``, so it is not timed twice). Without the MLP
(``projection_dim=None``, or after ``merge()``) the stage is a parameter read: nothing to time.

Three prefixes (``test_prefix_stage_three_prefixes``): an encoder-decoder's "encoder", "decoder" and
"cross" encoders of one shape (BART-large), forward+backward of all three. Providers: fused =
``grouped_prefix_kv_projection`` (three cuBLAS first Linears, then one launch for the three tails, one
per backward kernel; what ``grouped_key_values`` runs), separate = the three ``FusedPrefixEncoder``s
one after the other (a launch set each), eager = the reference per encoder, compile = torch.compile of
the three eager stages as one function; module = the fused call on CPU (the reference there).
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from dept_fast import FusedPrefixEncoder
from dept_fast.ops import grouped_prefix_kv_projection, prefix_kv_reference

from .stage import MODES, PROVIDERS, bench_stage, compiled, device_case, per_mode, skip_unless_available


@dataclass(frozen=True)
class PrefixCase:
    prefix_len: int   # p
    layers: int
    kv_heads: int
    head_dim: int
    embed_dim: int    # e, the model's hidden size
    mid: int          # MLP width
    dtype: torch.dtype

    @property
    def out_numel(self) -> int:
        return self.layers * 2 * self.kv_heads * self.prefix_len * self.head_dim

    def bytes_moved(self) -> dict:
        """Fewest bytes per mode: forward reads the five parameters and writes the prefixes; backward
        reads G and the parameters (p x mid hidden activations are negligible) and writes each
        parameter's gradient."""
        es = self.dtype.itemsize
        n_out = self.out_numel // self.prefix_len
        params = (self.prefix_len * self.embed_dim + (self.embed_dim + 1) * self.mid + (self.mid + 1) * n_out) * es
        out = self.out_numel * es
        forward = params + out
        backward = out + 2 * params
        return per_mode(forward, backward)


# On CPU all in float32 (bench/stage.py).
CASES = {
    # T5-base: one attention stack's prefixes (apply_prefix_tuning gives the encoder and decoder one each).
    "t5-base-fp32": PrefixCase(100, 12, 12, 64, 768, 512, torch.float32),
    "t5-base-bf16": PrefixCase(100, 12, 12, 64, 768, 512, torch.bfloat16),
    "llama7b-p100": PrefixCase(100, 32, 32, 128, 4096, 512, torch.bfloat16),
    # The Llama-shaped decoder of the model-level benchmark (bench/models.py) with a prefix of p 64.
    "llama-8L-d2048-p64": PrefixCase(64, 8, 4, 64, 2048, 512, torch.bfloat16),
    "tiny-launch-bound": PrefixCase(8, 2, 2, 16, 32, 32, torch.bfloat16),
}
ON_CUDA_SAME_AS_FUSED = {"module": "on CUDA FusedPrefixEncoder.forward is the `fused` provider (no host-side "
                                   "check to tell them apart)"}


def eager_prefix_stage(embedding: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                       b_out: torch.Tensor, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The encoder's forward in plain PyTorch, on the reference of the fused tail."""
    return prefix_kv_reference(F.linear(embedding, w_in, b_in), w_out, b_out, layers, kv_heads, head_dim)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_prefix_stage(benchmark, device, copy_gbps, name, mode, provider):
    skip_unless_available(provider, device, ON_CUDA_SAME_AS_FUSED if device.type == "cuda" else None)
    case = device_case(name, CASES, device)
    torch.manual_seed(0)  # nn.Embedding / nn.Linear default init: random, never zeros
    encoder = FusedPrefixEncoder(case.prefix_len, case.layers, case.kv_heads, case.head_dim,
                                 projection_dim=case.mid, embed_dim=case.embed_dim, dtype=case.dtype, device=device)
    if provider in ("fused", "module"):
        call = encoder
    else:
        fn = compiled(eager_prefix_stage) if provider == "compile" else eager_prefix_stage
        args = (encoder.embedding.weight, encoder.proj_in.weight, encoder.proj_in.bias, encoder.proj_out.weight,
                encoder.proj_out.bias, case.layers, case.kv_heads, case.head_dim)

        def call():
            return fn(*args)
    bench_stage(benchmark, device, copy_gbps, kind="prefix-stage", case=name, mode=mode, provider=provider,
                call=call, params=list(encoder.parameters()), bytes_moved=case.bytes_moved(),
                out_bytes=case.out_numel * case.dtype.itemsize, dtype=case.dtype,
                shape=f"p{case.prefix_len} layers{case.layers} kv{case.kv_heads}x{case.head_dim} "
                      f"e{case.embed_dim} mid{case.mid}")


# BART-large (12 layers per stack, 16 heads of 64, d 1024): its three prefixes, one encoder each, of one shape.
THREE_PREFIX_CASES = {
    "bart-large-x3-p5": PrefixCase(5, 12, 16, 64, 1024, 512, torch.bfloat16),
    "bart-large-x3-p200": PrefixCase(200, 12, 16, 64, 1024, 512, torch.bfloat16),
}
ENCODERS = ("encoder", "decoder", "cross")
THREE_PREFIX_PROVIDERS = ["eager", "compile", "fused", "separate", "module"]
THREE_PREFIX_CUDA_ONLY = {"separate": "three FusedPrefixEncoder launch sets need CUDA (on CPU they are the eager "
                                      "reference three times)"}


def _stage_args(encoder: FusedPrefixEncoder) -> tuple:
    return (encoder.embedding.weight, encoder.proj_in.weight, encoder.proj_in.bias, encoder.proj_out.weight,
            encoder.proj_out.bias)


def eager_three_prefix_stages(encoders_args, layers: int, kv_heads: int, head_dim: int):
    """Each encoder's forward in plain PyTorch (one function, so torch.compile sees all three)."""
    return [eager_prefix_stage(*args, layers, kv_heads, head_dim) for args in encoders_args]


def grouped_prefix_stages(encoders_args, layers: int, kv_heads: int, head_dim: int):
    """Every first Linear, then the three tails in one grouped launch; the three prefixes as views."""
    hidden = torch.stack([F.linear(embedding, w_in, b_in) for embedding, w_in, b_in, _, _ in encoders_args])
    return grouped_prefix_kv_projection(hidden, [args[3] for args in encoders_args],
                                        [args[4] for args in encoders_args], layers, kv_heads, head_dim).unbind(0)


@pytest.mark.parametrize("provider", THREE_PREFIX_PROVIDERS)
@pytest.mark.parametrize("name", THREE_PREFIX_CASES)
def test_prefix_stage_three_prefixes(benchmark, device, copy_gbps, name, provider):
    extra = ON_CUDA_SAME_AS_FUSED if device.type == "cuda" else THREE_PREFIX_CUDA_ONLY
    skip_unless_available(provider, device, extra)
    case = device_case(name, THREE_PREFIX_CASES, device)
    torch.manual_seed(0)
    encoders = [FusedPrefixEncoder(case.prefix_len, case.layers, case.kv_heads, case.head_dim,
                                   projection_dim=case.mid, embed_dim=case.embed_dim, dtype=case.dtype, device=device)
                for _ in ENCODERS]
    layout = (case.layers, case.kv_heads, case.head_dim)
    if provider == "separate":
        def call():
            return [encoder() for encoder in encoders]
    else:
        fn = {"eager": eager_three_prefix_stages, "compile": compiled(eager_three_prefix_stages)}.get(
            provider, grouped_prefix_stages)
        encoders_args = [_stage_args(encoder) for encoder in encoders]

        def call():
            return fn(encoders_args, *layout)
    one = case.bytes_moved()
    bench_stage(benchmark, device, copy_gbps, kind="prefix-stage", case=name, mode="forward+backward",
                provider=provider, call=call, params=[p for e in encoders for p in e.parameters()],
                bytes_moved={mode: len(ENCODERS) * b for mode, b in one.items()},
                out_bytes=len(ENCODERS) * case.out_numel * case.dtype.itemsize, dtype=case.dtype,
                shape=f"{len(ENCODERS)} x p{case.prefix_len} layers{case.layers} kv{case.kv_heads}x{case.head_dim} "
                      f"e{case.embed_dim} mid{case.mid}")
