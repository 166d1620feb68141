"""What the self-check costs when an adapter is attached (a script, not a benchmark suite).

    python -m bench.attach_cost [--threads N] [--repeats N]

Times ``apply_dept(model, 60, 30, 256)`` (shared prompt and prompt in every row) and
``apply_prefix_tuning(model, 64)`` on GPT-2 small's config (124 M parameters) and a 12-layer d 1024
grouped-query Llama, random weights, on the CPU, with the self-check (dept_fast/hf/verify.py) and
with its probes switched off; median of ``--repeats`` fresh models each, and one forward of 4
tokens for scale. Prints a markdown table.
"""
import argparse
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from . import conftest  # noqa: F401  (first: keeps the checkout's kernels/ folder from answering `import kernels`)
from dept_fast import apply_dept, apply_prefix_tuning  # noqa: E402
from dept_fast.hf import verify  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

MODELS = {
    "GPT-2 small (124 M)": lambda: GPT2LMHeadModel(GPT2Config()),
    "Llama, 12 layers, d 1024 (~250 M)": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
        vocab_size=32000)),
}
ATTACH = {
    "apply_dept, shared prompt": lambda m: apply_dept(m, 60, 30, 256),
    "apply_dept, prompt in every row": lambda m: apply_dept(m, 60, 30, 256, share_prompt=False),
    "apply_prefix_tuning": lambda m: apply_prefix_tuning(m, 64),
}


@contextmanager
def without_probes() -> Iterator[None]:
    saved = verify.DePTProbe.prepare, verify.PrefixProbe.prepare
    verify.DePTProbe.prepare = verify.PrefixProbe.prepare = classmethod(lambda cls, *args, **kwargs: None)
    try:
        yield
    finally:
        verify.DePTProbe.prepare, verify.PrefixProbe.prepare = saved


def seconds(build: Callable[[], nn.Module], attach: Callable[[nn.Module], nn.Module], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        model = build().eval()
        start = time.perf_counter()
        attach(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_ms(build: Callable[[], nn.Module]) -> float:
    model, ids = build().eval(), torch.randint(0, 1000, (1, 4))
    with torch.no_grad():
        model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(5):
            model(input_ids=ids)
    return (time.perf_counter() - start) / 5 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | attach | with the check (ms) | without (ms) | the check (ms) | one 4-token forward (ms) |")
    print("|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        forward = forward_ms(build)
        for what, attach in ATTACH.items():
            checked = seconds(build, attach, args.repeats)
            with without_probes():
                unchecked = seconds(build, attach, args.repeats)
            print(f"| {name} | {what} | {checked * 1e3:.0f} | {unchecked * 1e3:.0f} | "
                  f"{(checked - unchecked) * 1e3:.0f} | {forward:.0f} |")


if __name__ == "__main__":
    main()
