"""How long ``torch.compile(model, fullgraph=True)`` takes: the plain model against each adapter
route, in one run (a script, not a benchmark suite: one cold compile per method is the measurement).

    python -m bench.compile_time [--backend inductor|aot_eager] [--layers N] [--dynamic] [METHOD ...]

Methods: plain (the base model, its input embeddings trainable so the backward runs through every
layer), shared (DePT, the shared prompt), every-row (DePT, the prompt in every row), prefix
(Prefix-Tuning with its MLP). Each builds the decoder of bench/models.py (scaled down on CPU, with
``--layers`` layers) and times the first call of a forward + backward (the compile) and, for
reference, the median of calls 4 to 6 (the first few calls after a compile run slower on CPU),
unpadded b 4 x L 32. Every method runs in a process of its own with an empty inductor cache
directory, so none reuses kernels another compiled (in one process, later methods would).
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import torch
from torch import nn

from . import conftest  # noqa: F401  (first: keeps the checkout's kernels/ folder from answering `import kernels`)
from dept_fast import apply_dept, apply_prefix_tuning  # noqa: E402

from .models import DECODER, build_model  # noqa: E402

METHODS = ["plain", "shared", "every-row", "prefix"]


def adapted(method: str, layers: int, device: torch.device) -> nn.Module:
    case = dataclasses.replace(DECODER, config=dict(DECODER.config, num_hidden_layers=layers))
    model = build_model(case, device)
    if method == "plain":
        model.get_input_embeddings().weight.requires_grad_(True)
    elif method in ("shared", "every-row"):
        apply_dept(model, 8, 4, 64, share_prompt=method == "shared")
    elif method == "prefix":
        apply_prefix_tuning(model, 8, projection_dim=64)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return model.train()


def measure_one(method: str, backend: str, layers: int, dynamic: bool) -> dict:
    """Seconds of the first (compiling) call of ``method``'s compiled forward + backward, and the
    median of calls 4 to 6."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = adapted(method, layers, device)
    ids = torch.randint(3, DECODER.config["vocab_size"], (4, 32), device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=dynamic or None)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"method": method, "first_s": times[0], "later_s": statistics.median(times[3:]), "device": str(device)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", help=f"any of {METHODS} (default: all)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process measuring one method
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.backend, args.layers, args.dynamic)))
        return 0
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    print(f"torch {torch.__version__}, backend {args.backend}{', dynamic' if args.dynamic else ''}, "
          f"{args.layers} layers d{DECODER.hidden}, "
          f"{torch.get_num_threads()} threads; each method in a fresh process and inductor cache", flush=True)
    first = {}
    for method in args.methods or METHODS:
        with tempfile.TemporaryDirectory() as cache:
            child = subprocess.run([sys.executable, "-m", "bench.compile_time", "--one", method, "--backend",
                                    args.backend, "--layers", str(args.layers)] + ["--dynamic"] * args.dynamic,
                                   capture_output=True, text=True,
                                   env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                                            TORCHINDUCTOR_FX_GRAPH_CACHE="0"))
        if child.returncode:
            print(f"{method}: failed\n{child.stderr[-3000:]}", flush=True)
            continue
        record = json.loads(child.stdout.strip().splitlines()[-1])
        first[method] = record["first_s"]
        ratio = f", {record['first_s'] / first['plain']:.2f}x plain" if "plain" in first and method != "plain" else ""
        print(f"{method}: first call (compile) {record['first_s']:.1f} s{ratio}; later calls "
              f"{record['later_s'] * 1e3:.1f} ms ({record['device']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
