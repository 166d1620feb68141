"""Test setup: Triton kernels run on CPU through the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, i.e. before
``dept_fast.kernels`` is imported, which is why it is set here at import time. A deprecation
warning our code causes fails the suite (tests/own_warnings.py).
"""
import os

import pytest
import torch

import own_warnings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernel tests run: the GPU when there is one, else CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); run bench/gpu_session.sh on a GPU box")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison(monkeypatch):
    """Make every kernel output buffer start as NaN (floats) or -1 (ints), so any element a
    kernel fails to write shows up in the comparison instead of passing by luck."""
    from dept_fast.kernels import buffers

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(buffers, "allocate", poisoned)



def pytest_configure(config):
    own_warnings.install()


def pytest_unconfigure(config):
    own_warnings.uninstall()


def pytest_sessionfinish(session, exitstatus):
    if own_warnings.recorded and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if own_warnings.recorded:
        terminalreporter.section("deprecation warnings caused by our code (tests/own_warnings.py)")
        for text in dict.fromkeys(own_warnings.recorded):
            terminalreporter.write_line(text)
