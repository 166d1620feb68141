"""What the stage suites (DePT embedding stage, Prefix-Tuning encoder stage) share: providers,
modes, the torch.compile baseline, and the body of one benchmark.

Providers:
    eager    the plain PyTorch composition (built on ``dept_fast.ops``' references)
    compile  ``torch.compile(eager, dynamic=False)``                               (CUDA only)
    fused    dept_fast's Triton path                                               (CUDA only)
    module   the library's public call where it differs from ``fused`` (see each suite)
Modes: forward (no grad), backward (of a retained graph), forward+backward.
Dtypes: on CUDA each case runs in its own dtype; on CPU every case runs in float32 (CPU_DTYPE).
"""
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, TypeVar, Union

import pytest
import torch

from .measure import measure

MODES = ["forward", "backward", "forward+backward"]
PROVIDERS = ["eager", "compile", "fused", "module"]
CUDA_ONLY = {
    "compile": "torch.compile(eager) is the GPU baseline; on CPU its inductor compile (tens of seconds per "
               "shape) would dominate a smoke run, and CPU speed is not what dept_fast targets",
    "fused": "the fused Triton kernels need CUDA (interpreted on CPU their timings are meaningless); "
             "on CPU the `module` provider times the library's CPU path",
}
# A CPU without native bf16 can multiply bf16 matrices at under 1 GFLOP/s (0.6 on an AVX2-only CPU, issue
# 12), where the 7B-sized stages take hours. A CPU run is a smoke run, not a measure of the GPU dtypes, so
# every stage case runs in float32 there, whatever the CPU.
CPU_DTYPE = torch.float32
CPU_DTYPE_NOTE = ("stage cases on CPU run in float32, whatever dtype they have on CUDA (a CPU without native "
                  "bf16 can multiply bf16 at under 1 GFLOP/s; a CPU run is a smoke run)")
Case = TypeVar("Case")
Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]
# One static graph per (case, grad mode) per compiled function; past dynamo's recompile limit it would
# silently run eager code, so the limit is raised for the whole session.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, one per function for the whole session."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False)


def device_case(name: str, cases: Dict[str, Case], device: torch.device) -> Case:
    """``cases[name]`` as it runs on ``device``: unchanged on CUDA, in :data:`CPU_DTYPE` on CPU.

    Skips the running benchmark, saying so, when on CPU the case would repeat another case of
    ``cases`` (e.g. ``t5-base-bf16`` is ``t5-base-fp32`` once in float32).
    """
    case = cases[name]
    if device.type == "cuda" or case.dtype == CPU_DTYPE:
        return case
    case = dataclasses.replace(case, dtype=CPU_DTYPE)
    twin = next((other for other, c in cases.items() if c == case), None)
    if twin is not None:
        pytest.skip(f"on CPU every stage case runs in {str(CPU_DTYPE)[6:]}, where {name} is {twin} again")
    return case


def per_mode(forward: int, backward: int) -> Dict[str, int]:
    """Bytes (or any additive cost) of each mode from those of the forward and the backward."""
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def _outputs(out: Outputs) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def mode_runner(call: Callable[[], Outputs], mode: str) -> Callable[[], object]:
    """One call of ``mode``: ``call()`` computes the stage's output (a tensor, or a list of them); in
    backward mode the forward graph is built once and retained; the output gradients are random
    (never zeros)."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return call()
        return run
    outs = _outputs(call())
    grads = [torch.randn_like(out) for out in outs]
    if mode == "backward":
        return lambda: torch.autograd.backward(outs, grads, retain_graph=True)
    del outs
    return lambda: torch.autograd.backward(_outputs(call()), grads)


def bench_stage(benchmark, device: torch.device, copy_gbps: float, *, kind: str, case: str, mode: str,
                provider: str, call: Callable[[], Outputs], params: Sequence[torch.Tensor],
                bytes_moved: Dict[str, int], out_bytes: int, dtype: torch.dtype, shape: str) -> None:
    """The body of one stage benchmark (skips are decided by the caller, before building inputs).

    ``bytes_moved`` maps each mode to the fewest bytes it must move; ``out_bytes`` is the size of
    the stage's output, against which the peak extra memory is compared.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"{kind} {case} {mode} {dtype_name}"
    run = mode_runner(call, mode)
    info = dict(kind=kind, case=case, mode=mode, provider=provider, dtype=dtype_name, shape=shape,
                out_bytes=out_bytes, note=CPU_DTYPE_NOTE if device.type != "cuda" else None)
    measure(benchmark, run, device, info, grad_to_none=params if mode != "forward" else (),
            bytes_moved=bytes_moved[mode], copy_gbps=copy_gbps)


def skip_unless_available(provider: str, device: torch.device, extra: Optional[Dict[str, str]] = None) -> None:
    """Skip the running benchmark, with the reason, when ``provider`` cannot run on ``device``."""
    reason = (CUDA_ONLY.get(provider) if device.type != "cuda" else None) or (extra or {}).get(provider)
    if reason:
        pytest.skip(reason)
