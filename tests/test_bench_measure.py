"""bench/measure.py on CPU: the rounds of a benchmark come from its warm-up call and stay bounded,
so a loaded CPU cannot stretch a 0.1 ms op to thousands of slow rounds (no benchmark run needed)."""
import pytest
import torch

import bench_modules


@pytest.fixture(scope="module")
def measure():
    return bench_modules.load("measure")


class RecordingBenchmark:
    """Stands in for pytest-benchmark's fixture: runs ``pedantic`` as asked and remembers how."""

    def __init__(self):
        self.extra_info, self.pedantic_rounds = {}, None

    def __call__(self, target):
        raise AssertionError("on CPU measure() must choose the rounds itself (pedantic)")

    def pedantic(self, target, rounds, iterations):
        assert iterations == 1
        self.pedantic_rounds = rounds
        for _ in range(rounds):
            target()


def test_cpu_rounds_fill_the_budget_within_bounds(measure):
    low, high = measure.CPU_ROUNDS_RANGE
    assert measure.cpu_rounds(measure.CPU_ROUNDS_S / 10) == 10
    assert measure.cpu_rounds(1e-6) == high  # a tiny op: capped
    assert measure.cpu_rounds(60.0) == low   # a slow op: still the median of a few calls


def test_measure_on_cpu_runs_the_warm_up_then_its_rounds(measure, monkeypatch):
    monkeypatch.setattr(measure, "RECORDS", [])
    calls = []
    benchmark = RecordingBenchmark()
    record = measure.measure(benchmark, lambda: calls.append(1), torch.device("cpu"), {"kind": "test"})
    low, high = measure.CPU_ROUNDS_RANGE
    assert low <= benchmark.pedantic_rounds <= high
    assert len(calls) == 1 + benchmark.pedantic_rounds
    assert record["kind"] == "test" and measure.RECORDS == [record]
