"""Benchmark session setup: the device, the copy-bandwidth ceiling, versions in the JSON, a summary.

Run with ``pytest bench --benchmark-only`` (add ``--benchmark-json=FILE`` for ``python -m
bench.report``). Unlike tests/, this never switches the Triton interpreter on: interpreted
kernels run orders of magnitude slower than compiled ones, so their timings mean nothing, and a
session that has ``TRITON_INTERPRET=1`` set skips every benchmark.
"""
import importlib.util
import os
import platform
import shlex
import sys
from typing import Optional

import pytest
import torch

from . import measure, report, stage

CHECKOUT_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "")


def hide_checkout_kernels() -> None:
    """Keep the checkout's top-level ``kernels/`` folder from answering to ``import kernels``.

    bench/ is a package, so pytest puts the checkout root first on ``sys.path`` to import it, and
    there the folder (installed as ``dept_fast.kernels``) would be found under the name of a PyPI
    package that transformers probes for and then imports: without triton that import fails, and
    ``from transformers import ...`` with it. Where the name resolves to that folder, it is marked
    absent (the PyPI package, if installed, is shadowed in this session anyway).
    """
    spec = importlib.util.find_spec("kernels")
    if spec is not None and (spec.origin or "").startswith(CHECKOUT_KERNELS):
        sys.modules["kernels"] = None


hide_checkout_kernels()


def pytest_collection_modifyitems(config, items):
    # Read here, not at import: every conftest (tests/conftest.py may set it) has been loaded by now.
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 is set (by you, or by tests/conftest.py when bench/ and "
                                   "tests/ run in one session): interpreter timings are meaningless; run "
                                   "`pytest bench --benchmark-only` on its own with TRITON_INTERPRET unset")
    for item in items:
        if item.path.is_relative_to(os.path.dirname(__file__)):
            item.add_marker(skip)


def pytest_report_header(config) -> Optional[str]:
    """On CPU, what the smoke run changes from the GPU protocol (shown unless -q)."""
    if measure.bench_device().type == "cuda":
        return None
    low, high = measure.CPU_ROUNDS_RANGE
    return (f"dept_fast benchmarks on CPU ({torch.get_num_threads()} threads), a smoke run: every stage case in "
            f"{str(stage.CPU_DTYPE)[6:]} (not bf16), model shapes scaled down, torch.compile and the fused "
            f"kernels skipped; rounds: as many as fit in {measure.CPU_ROUNDS_S} s after a warm-up call, "
            f"{low} to {high} (not the benchmark defaults above)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return measure.bench_device()


@pytest.fixture(scope="session")
def copy_gbps(device) -> float:
    """The copy-bandwidth ceiling (GB/s, read + write) of this device, measured once per session."""
    return measure.copy_bandwidth_gbps(device)


def versions() -> dict:
    """Library versions and the device, as recorded with every run."""
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {_cpu_name()}",
        "device_type": "cuda" if cuda else "cpu",
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dept_fast"] = versions()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dept_fast"] = {"command": shlex.join(["pytest", *sys.argv[1:]])}


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter):
    if not measure.RECORDS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("dept_fast benchmarks (what the numbers mean: bench/measure.py)")
    if torch.cuda.is_available():
        write("pytest-benchmark's tables above time each call on the host clock with a synchronize after it "
              "(launch overhead included); the ms below are device time.")
    for line in report.summary_lines(measure.RECORDS):
        write(line)
