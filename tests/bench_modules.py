"""bench/ modules that import nothing of their package (measure.py, report.py), loaded by path for the
tests: the repository root is not importable as such (its kernels/ would shadow PyPI's `kernels`)."""
import importlib.util
import pathlib
from types import ModuleType

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    """A fresh ``bench/<name>.py`` module, named ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
