"""The benchmark suites' shapes (bench/test_dept_stage.py, bench/test_prefix_stage.py, bench/models.py),
imported by path: the repository root is not importable as such (its kernels/ would shadow PyPI's `kernels`)."""
import importlib
import importlib.util
import pathlib
import sys
from types import ModuleType
from typing import Dict, NamedTuple

import torch

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


def three_prefix_cases() -> Dict[str, object]:
    """name -> PrefixCase of an encoder-decoder's three same-shaped prefixes (BART-large), evaluated grouped."""
    return _bench_module("test_prefix_stage").THREE_PREFIX_CASES


class MixedCase(NamedTuple):
    """A mixed-task batch of the DePT stage: ``adapters`` DePT adapters of one size, one per row."""

    batch: int
    seq_len: int   # L, also each adapter's max_length s
    vocab: int
    dim: int
    adapters: int  # k
    prompt: int    # m
    rank: int      # r
    dtype: torch.dtype


def mixed_cases() -> Dict[str, MixedCase]:
    """name -> MixedCase: the mixed-batch benchmark, 16 adapters over the 8-layer decoder of bench/models.py."""
    config = _bench_module("models").LLAMA_8L
    return {"llama-8L-d2048-k16": MixedCase(32, 256, config["vocab_size"], config["hidden_size"], 16, 60, 30,
                                            torch.bfloat16)}
