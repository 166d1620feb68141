"""The checkout's top-level kernels/ folder must not answer to ``import kernels`` (the name of a PyPI
package that transformers probes for and imports) where the benchmarks run: not in a ``pytest bench``
session, and not in any step of bench/gpu_session.sh."""
import os
import pathlib
import stat
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Collects the benchmarks as where triton is not installed, then says where `kernels` resolves.
COLLECT_WITHOUT_TRITON = """
import importlib.util, sys
sys.modules["triton"] = None
import pytest
code = pytest.main([sys.argv[1], "--collect-only", "-q", "-p", "no:cacheprovider"])
spec = importlib.util.find_spec("kernels")
print("RESULT", int(code), spec.origin if spec else None)
"""


def test_bench_collects_without_triton_and_hides_checkout_kernels(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT_TRITON, str(ROOT / "bench")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, code, origin = result[-1].split(" ", 2)
    assert code == "0", proc.stdout[-3000:]  # transformers imported, every suite collected
    assert not origin.startswith(str(ROOT / "kernels")), origin


def test_gpu_session_runs_python_away_from_the_checkout_root(tmp_path):
    """gpu_session.sh with a stand-in python that logs each call: the checkout is installed first,
    and no call gets the checkout root as its working directory or on PYTHONPATH."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$PWD|${{PYTHONPATH-}}|$*" >> "{calls}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(stub), OUT=str(tmp_path / "out"))
    subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], cwd=ROOT, env=env, capture_output=True,
                   timeout=60)  # exits non-zero: the stand-in writes no benchmark JSON
    lines = calls.read_text().splitlines()
    assert len(lines) >= 5, lines  # install, environment, tests, two bench steps
    assert "pip install --no-deps --no-build-isolation" in lines[0] and lines[0].endswith(f"-e {ROOT}")
    for line in lines:
        cwd, pythonpath, _ = line.split("|", 2)
        assert not pathlib.Path(cwd).resolve().is_relative_to(ROOT), line
        assert str(ROOT) not in pythonpath.split(os.pathsep) and "." not in pythonpath.split(os.pathsep), line
