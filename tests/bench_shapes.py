"""The benchmark suites' shapes (bench/test_dept_stage.py, bench/test_prefix_stage.py), imported by path:
the repository root is not importable as such (its kernels/ would shadow PyPI's `kernels`)."""
import importlib
import importlib.util
import pathlib
import sys
from types import ModuleType
from typing import Dict

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def _bench_module(name: str) -> ModuleType:
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench", BENCH / "__init__.py",
                                                      submodule_search_locations=[str(BENCH)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{name}")


def dept_cases() -> Dict[str, object]:
    """name -> StageCase(batch, seq_len, vocab, dim, prompt, rank, dtype)."""
    return _bench_module("test_dept_stage").CASES


def prefix_cases() -> Dict[str, object]:
    """name -> PrefixCase(prefix_len, layers, kv_heads, head_dim, embed_dim, mid, dtype)."""
    return _bench_module("test_prefix_stage").CASES
