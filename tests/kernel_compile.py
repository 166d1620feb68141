"""Compile every Triton kernel of dept_fast for sm_80 (A100) and sm_90 (H100) without a GPU.

    python tests/kernel_compile.py [--targets 80,90]      # one JSON object per line on stdout

The launchers run on ``meta`` tensors of the benchmark shapes inside ``kernels.tiling.dry_run``, so
each launch is recorded with the grid, constexprs and ``num_warps`` the launcher's plan picks for a
GPU with that target's SM count, and its exact arguments; each is then specialised as Triton's JIT
does (pointer and int types, 16-divisibility, ints equal to 1 as constants) and compiled with
``triton.compile`` for the target. Registers and local memory (spills) come from ``cuobjdump
-res-usage`` on the cubin. One case per kernel x dtype: fp32 and fp16 at T5-base, bf16 at Llama-7B
dims, each DePT kernel also with a model's embedding multiplier (``embed_scale`` != 1, "c!=1"). Must
run without ``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreter functions);
tests/test_kernel_compile.py runs it in a subprocess. Prints ``{"skip": reason}`` where Triton's
CUDA compiler cannot run here.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, Optional, Tuple

SM_COUNTS = {80: 108, 90: 132}  # A100, H100 SXM
EMBED_SCALE = 27.7  # a model's embedding multiplier != 1 (sqrt(768), T5-base's width)
_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


def compiler_unavailable() -> Optional[str]:
    """Why Triton cannot compile CUDA kernels here (None if it can)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: @triton.jit would define interpreter functions"
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend on this platform"
    try:
        for tool in (triton.knobs.nvidia.ptxas, triton.knobs.nvidia.cuobjdump):
            subprocess.run([tool.path, "--version"], check=True, capture_output=True)
    except (AttributeError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f"triton {triton.__version__} cannot run its ptxas/cuobjdump: {type(e).__name__}: {e}"
    return None


def cases() -> Iterator[Tuple[str, str, Callable[[], None]]]:
    """(label, dtype, call of the launchers on meta tensors) for one benchmark shape per dtype (also with
    embed_scale != 1), the mixed-batch benchmark (k packed adapters, one per row) in each dtype, and an
    encoder-decoder's three prefixes in one grouped launch per kernel."""
    import torch
    from bench_shapes import dept_cases, mixed_cases, prefix_cases, three_prefix_cases
    from dept_fast.kernels import (AdapterRows, dept_backward, dept_forward, grouped_prefix_kv_backward,
                                   grouped_prefix_kv_forward, prefix_kv_backward, prefix_kv_forward)

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    shapes = {"fp32": ("t5-base-fp32", torch.float32), "fp16": ("t5-base-bf16", torch.float16),
              "bf16": ("llama7b-b64-s512", torch.bfloat16)}
    for dtype_name, (name, dt) in shapes.items():
        c = dept_cases()[name]
        ids, n_pos = t(c.batch, c.seq_len, dtype=torch.int64), c.prompt + c.seq_len
        lora = (t(c.seq_len, c.rank, dtype=dt), t(c.rank, c.dim, dtype=dt))
        for embed_scale, tag in ((1.0, ""), (EMBED_SCALE, " c!=1")):
            yield f"dept-fwd {name}{tag}", dtype_name, \
                lambda c=c, dt=dt, ids=ids, lora=lora, e=embed_scale: dept_forward(
                    ids, t(c.vocab, c.dim, dtype=dt), t(c.prompt, c.dim, dtype=dt), *lora, 1.0, embed_scale=e)
        for emb, embed_scale, tag in ((None, 1.0, ""), (dt, 1.0, " +dE"), (dt, EMBED_SCALE, " +dE c!=1")):
            yield f"dept-bwd {name}{tag}", dtype_name, \
                lambda c=c, dt=dt, ids=ids, lora=lora, n_pos=n_pos, emb=emb, e=embed_scale: dept_backward(
                    t(c.batch, n_pos, c.dim, dtype=dt), ids, c.vocab, *lora, 1.0, c.prompt, dt, emb_dtype=emb,
                    embed_scale=e)
    name, c = next(iter(mixed_cases().items()))
    k, n_pos = c.adapters + 1, c.prompt + c.seq_len  # the trailing no-adapter pack
    ids = t(c.batch, c.seq_len, dtype=torch.int64)
    rows = AdapterRows(t(c.batch, dtype=torch.int64), t(c.batch, dtype=torch.int64), t(k + 1, dtype=torch.int64))
    scaling = t(k, dtype=torch.float32)
    for dtype_name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        lora = (t(k, c.seq_len, c.rank, dtype=dt), t(k, c.rank, c.dim, dtype=dt))
        yield f"dept-fwd {name}", dtype_name, lambda dt=dt, lora=lora: dept_forward(
            ids, t(c.vocab, c.dim, dtype=dt), t(k, c.prompt, c.dim, dtype=dt), *lora, scaling, rows)
        for emb in (None, dt):
            yield f"dept-bwd {name}{' +dE' if emb else ''}", dtype_name, \
                lambda dt=dt, lora=lora, emb=emb: dept_backward(t(c.batch, n_pos, c.dim, dtype=dt), ids, c.vocab, *lora,
                                                                scaling, c.prompt, dt, emb_dtype=emb, rows=rows)
    shapes = {"fp32": ("t5-base-fp32", torch.float32), "fp16": ("t5-base-bf16", torch.float16),
              "bf16": ("llama7b-p100", torch.bfloat16)}
    for dtype_name, (name, dt) in shapes.items():
        c = prefix_cases()[name]
        n_out = c.layers * 2 * c.kv_heads * c.head_dim
        hidden, weight = t(c.prefix_len, c.mid, dtype=dt), t(n_out, c.mid, dtype=dt)
        yield f"pkv-fwd {name}", dtype_name, lambda c=c, dt=dt, hidden=hidden, weight=weight: prefix_kv_forward(
            hidden, weight, t(weight.shape[0], dtype=dt), c.layers, c.kv_heads, c.head_dim)
        yield f"pkv-bwd {name}", dtype_name, lambda c=c, dt=dt, hidden=hidden, weight=weight: prefix_kv_backward(
            t(c.layers, 2, c.kv_heads, c.prefix_len, c.head_dim, dtype=dt), hidden, weight, dt)
    # Three prefixes of one shape in one launch per kernel (BART-large p 200, bf16): the offsets-table variant.
    name, c = "bart-large-x3-p200", three_prefix_cases()["bart-large-x3-p200"]
    n_out, groups = c.layers * 2 * c.kv_heads * c.head_dim, 3
    hidden, weights = t(groups, c.prefix_len, c.mid, dtype=c.dtype), [t(n_out, c.mid, dtype=c.dtype)] * groups
    yield f"pkv-fwd {name}", "bf16", lambda: grouped_prefix_kv_forward(
        hidden, weights, [t(n_out, dtype=c.dtype)] * groups, c.layers, c.kv_heads, c.head_dim)
    yield f"pkv-bwd {name}", "bf16", lambda: grouped_prefix_kv_backward(
        t(groups, c.layers, 2, c.kv_heads, c.prefix_len, c.head_dim, dtype=c.dtype), hidden, weights, c.dtype)


def specialise(kernel, args: tuple, meta: Dict[str, object]) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, as Triton's JIT specialises its arguments."""
    import torch
    names = kernel.arg_names
    constexprs = {k: v for k, v in meta.items() if k in names}
    options = {k: v for k, v in meta.items() if k not in names}
    runtime = [n for n in names if n not in constexprs]
    assert len(runtime) == len(args), f"{kernel.__name__}: {len(args)} arguments for {runtime}"
    signature, attrs = {}, {}
    for name, value in zip(runtime, args):
        index = (names.index(name),)
        if isinstance(value, torch.Tensor):  # torch allocations are 16-byte aligned
            signature[name], attrs[index] = "*" + _TYPES[str(value.dtype).split(".")[-1]], [["tt.divisibility", 16]]
        elif value is None:  # an absent optional pointer (e.g. no offsets table for one group): a constexpr
            signature[name], constexprs[name] = "constexpr", None
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in names if name in meta})
    return signature, constexprs, attrs, options


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the cubin's kernel, from ``cuobjdump -res-usage``."""
    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_launch(kernel, plan, args: tuple, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", cc, 32)
    signature, constexprs, attrs, options = specialise(kernel, args, plan.meta)
    row = dict(kernel=kernel.__name__.lstrip("_"), target=f"sm_{cc}", programs=plan.programs,
               constexprs={k: v for k, v in constexprs.items() if k.isupper()}, **options)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=make_backend(target).parse_options(options).__dict__)
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        return dict(row, error=f"{type(e).__name__}: {str(e)[:2000]}")
    usage = resource_usage(compiled.asm["cubin"])
    return dict(row, registers=usage["reg"], spill_bytes=usage["stack"] + usage["local"],
                shared=compiled.metadata.shared)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    targets = [int(cc) for cc in parser.parse_args().targets.split(",")]
    reason = compiler_unavailable()
    if reason:
        print(json.dumps({"skip": reason}))
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; the default is on
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dept_fast.kernels import tiling

    for cc in targets:
        for label, dtype, call in cases():
            with tiling.dry_run(SM_COUNTS[cc]) as launches:
                call()
            for kernel, plan, args in launches:
                print(json.dumps(dict(case=label, dtype=dtype, **compile_launch(kernel, plan, args, cc))),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
