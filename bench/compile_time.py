"""How long ``torch.compile(model, fullgraph=True)`` takes: the plain model against each adapter
route, in one run (a script, not a benchmark suite: one cold compile per method is the measurement).

    python -m bench.compile_time [--backend inductor|aot_eager] [--layers N] [METHOD ...]

Methods: plain (the base model, its input embeddings trainable so the backward runs through every
layer), shared (DePT, the shared prompt), every-row (DePT, the prompt in every row), prefix
(Prefix-Tuning with its MLP). Each builds the decoder of bench/models.py (scaled down on CPU, with
``--layers`` layers), resets Dynamo and times the first call of a forward + backward (the compile)
and a second one, unpadded b 4 x L 32; the inductor FX graph cache is off, so nothing is reused from
disk (kernels compiled earlier in the same run may still be).
"""
import argparse
import dataclasses
import sys
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", choices=METHODS, help=f"default: all of {METHODS}")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    torch._inductor.config.fx_graph_cache = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device}, backend {args.backend}, {args.layers} layers d{DECODER.hidden}")
    first = {}
    for method in args.methods or METHODS:
        model = adapted(method, args.layers, device)
        ids = torch.randint(3, DECODER.config["vocab_size"], (4, 32), device=device)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=args.backend)
        times = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            compiled(input_ids=ids, labels=ids).loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        first[method] = times[0]
        ratio = f", {times[0] / first['plain']:.2f}x plain" if "plain" in first and method != "plain" else ""
        print(f"{method}: first call (compile) {times[0]:.1f} s{ratio}; second call {times[1] * 1e3:.1f} ms",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
