"""What the stage suites (DePT embedding stage, Prefix-Tuning encoder stage) share: providers,
modes, the torch.compile baseline, and the body of one benchmark.

Providers:
    eager    the plain PyTorch composition (built on ``dept_fast.ops``' references)
    compile  ``torch.compile(eager, dynamic=False)``                               (CUDA only)
    fused    dept_fast's Triton path                                               (CUDA only)
    module   the library's public call where it differs from ``fused`` (see each suite)
Modes: forward (no grad), backward (of a retained graph), forward+backward.
"""
import functools
from typing import Callable, Dict, Optional, Sequence

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


def per_mode(forward: int, backward: int) -> Dict[str, int]:
    """Bytes (or any additive cost) of each mode from those of the forward and the backward."""
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


def mode_runner(call: Callable[[], torch.Tensor], mode: str) -> Callable[[], object]:
    """One call of ``mode``: ``call()`` computes the stage's output; in backward mode the forward
    graph is built once and retained; the output gradient is random (never zeros)."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return call()
        return run
    out = call()
    grad_out = torch.randn_like(out)
    if mode == "backward":
        return lambda: out.backward(grad_out, retain_graph=True)
    del out
    return lambda: call().backward(grad_out)


def bench_stage(benchmark, device: torch.device, copy_gbps: float, *, kind: str, case: str, mode: str,
                provider: str, call: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                bytes_moved: Dict[str, int], out_bytes: int, dtype: torch.dtype, shape: str) -> None:
    """The body of one stage benchmark (skips are decided by the caller, before building inputs).

    ``bytes_moved`` maps each mode to the fewest bytes it must move; ``out_bytes`` is the size of
    the stage's output, against which the peak extra memory is compared.
    """
    benchmark.group = f"{kind} {case} {mode}"
    run = mode_runner(call, mode)
    info = dict(kind=kind, case=case, mode=mode, provider=provider, dtype=str(dtype).removeprefix("torch."),
                shape=shape, out_bytes=out_bytes)
    measure(benchmark, run, device, info, grad_to_none=params if mode != "forward" else (),
            bytes_moved=bytes_moved[mode], copy_gbps=copy_gbps)


def skip_unless_available(provider: str, device: torch.device, extra: Optional[Dict[str, str]] = None) -> None:
    """Skip the running benchmark, with the reason, when ``provider`` cannot run on ``device``."""
    reason = (CUDA_ONLY.get(provider) if device.type != "cuda" else None) or (extra or {}).get(provider)
    if reason:
        pytest.skip(reason)
