"""How every benchmark in bench/ measures: one place, the same rules for every suite.

Time. On CUDA the reported ``ms`` is the median of ``triton.testing.do_bench`` (a warm-up first,
then CUDA events around each call, the L2 cache flushed before each call): device time, free of
the host's launch overhead except where the measured code itself waits for the host (e.g. an
id-range check that syncs). pytest-benchmark's own statistics (its terminal table and ``stats``
in its JSON) time the same call on the host clock, each call followed by
``torch.cuda.synchronize()``, so on CUDA they include launch and sync overhead; on CPU they are
the measurement and ``ms`` is their median. Every record names the timer that gave its ``ms``.
On CPU the number of rounds comes from the warm-up call and is bounded (:func:`cpu_rounds`), not
from pytest-benchmark's calibration, which fixes it up front as ``max_time`` over one trial call,
with no upper bound: on a loaded CPU a 0.1 ms op then ran thousands of rounds of up to 100 ms
each, tens of seconds per benchmark.

Memory. On CUDA "peak extra" is ``torch.cuda.max_memory_allocated()`` during one call minus what
was allocated just before it (inputs, weights and, in backward mode, the saved forward graph).
PyTorch has no such counter for CPU tensors, so CPU records have none.

Attention kernels. :func:`sdpa_kernels` names the kernels ``F.scaled_dot_product_attention``
dispatched to during one extra call (the aten op of each, as the profiler records it): on CUDA
flash, efficient (memory-efficient), cudnn or math; on CPU its flash kernel or math.

Bandwidth. A record's ``bytes`` is the fewest bytes its op must move (each input read once, each
output written once). The report divides it by ``ms`` (GB/s) and compares that with
``copy_gbps``, a large device-to-device copy timed in the same session (bytes read + written):
the memory floor of the op is ``bytes / copy_gbps``.
"""
import gc
import statistics
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Every measure() call appends its record here; conftest.py prints them as the closing summary.
RECORDS: List[Dict] = []

# CPU rounds: as many as fit in CPU_ROUNDS_S after the warm-up call, within CPU_ROUNDS_RANGE.
CPU_ROUNDS_S = 0.5
CPU_ROUNDS_RANGE = (3, 100)

DEVICE_TIMER = "CUDA-event median (triton.testing.do_bench)"
WALL_TIMER = "wall-clock median (pytest-benchmark)"


def bench_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured copy ceiling in GB/s (bytes read + bytes written) of one large ``dst.copy_(src)``."""
    numel = (nbytes if device.type == "cuda" else nbytes // 4) // 4  # 256 MiB on CPU keeps CI quick
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200)
    return 2 * src.nbytes / ms / 1e6


def time_ms(run: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median time of ``run`` in ms: CUDA events via do_bench on CUDA, the host clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                        return_mode="median")
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    run()  # warm-up: first-touch page faults, thread pools
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
        _drop_grads(grad_to_none)
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_rounds(warmup_s: float) -> int:
    """Rounds of a CPU benchmark whose warm-up call took ``warmup_s`` seconds."""
    low, high = CPU_ROUNDS_RANGE
    return max(low, min(high, int(CPU_ROUNDS_S / max(warmup_s, 1e-9))))


def _drop_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _peak_extra_bytes(run: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> int:
    """Bytes allocated on the GPU at the peak of one call, above what was allocated before it."""
    _drop_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def measure(benchmark, run: Callable[[], object], device: torch.device, info: Dict, *,
            grad_to_none: Sequence[torch.Tensor] = (), bytes_moved: Optional[int] = None,
            copy_gbps: Optional[float] = None, warmup_ms: float = 25, rep_ms: float = 100,
            rounds: Optional[int] = None) -> Dict:
    """Time ``run`` and record the result in ``benchmark.extra_info`` (and :data:`RECORDS`).

    Args:
        benchmark: the pytest-benchmark fixture; its own statistics come from timing ``run`` on
            the host clock (synchronised on CUDA).
        run: one call of the measured work; what it returns is kept alive until the memory peak
            is read (so a forward's output counts towards peak extra memory).
        device: where ``run`` computes.
        info: what identifies the record (kind, case, mode, provider, ...); copied into it.
        grad_to_none: tensors whose ``.grad`` is reset before each call (as do_bench does), so
            gradient accumulation is neither timed nor counted as memory.
        bytes_moved: fewest bytes the op must move, for GB/s and % of the copy ceiling.
        copy_gbps: the copy ceiling measured in this session.
        warmup_ms, rep_ms: do_bench's warm-up and repetition budgets (ms).
        rounds: for work that takes seconds (``generate()``): one warm-up call, then this many
            calls on the host clock (synchronised on CUDA), on every device; no memory peak.

    Returns:
        The record (also in ``benchmark.extra_info``).
    """
    record = dict(info, device=_device_name(device), bytes=bytes_moved, copy_gbps=copy_gbps)
    if rounds is not None:
        run()
    elif device.type == "cuda":
        record.update(ms=time_ms(run, device, warmup_ms, rep_ms, grad_to_none), timer=DEVICE_TIMER,
                      peak_extra_bytes=_peak_extra_bytes(run, grad_to_none))
    else:
        start = time.perf_counter()
        run()  # warm-up outside pytest-benchmark's rounds
        warmup_s = time.perf_counter() - start

    def synced_run():
        _drop_grads(grad_to_none)
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if rounds is not None:
        benchmark.pedantic(synced_run, rounds=rounds, iterations=1)
    elif device.type == "cuda":
        benchmark(synced_run)
    else:
        benchmark.pedantic(synced_run, rounds=cpu_rounds(warmup_s), iterations=1)
    stats = getattr(benchmark, "stats", None)
    wall_ms = stats.stats.median * 1e3 if stats is not None else None
    record["wall_ms"] = wall_ms
    if device.type != "cuda" or rounds is not None:
        record.update(ms=wall_ms, timer=WALL_TIMER)
    benchmark.extra_info.update(record)
    RECORDS.append(record)
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}
"""The aten op each sdpa kernel runs as (forward; backward ops are not counted)."""


def sdpa_kernels(run: Callable[[], object]) -> str:
    """Which sdpa kernels one call of ``run`` ran, with counts (e.g. "flash x16"); "none" if sdpa
    never ran. One untimed call under the profiler (CPU activity: it sees the ops of CUDA calls too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts = Counter(SDPA_KERNELS[e.name] for e in prof.events() if e.name in SDPA_KERNELS)
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())) or "none"
