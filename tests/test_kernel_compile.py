"""Every Triton kernel compiles for sm_80 and sm_90 at the launch configurations its launcher picks for
the benchmark shapes, and no 16-bit configuration spills registers. No GPU needed: Triton's compiler
and the ptxas/cuobjdump in its wheel run on CPU (tests/kernel_compile.py, in subprocesses because
conftest.py has switched this process to the interpreter). About a minute on 2 cores."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("kernel_compile.py")
TARGETS = ("80", "90")
KERNELS = {"dept_fwd_kernel", "dept_bwd_kernel", "prefix_kv_fwd_kernel", "prefix_kv_bwd_weight_kernel",
           "prefix_kv_bwd_hidden_kernel"}


@pytest.fixture(scope="module")
def compiled():
    """One row per compiled launch: kernel, target, dtype, registers, spill_bytes (or error)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--targets", cc], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for cc in TARGETS]  # one per core
    rows = []
    for run in runs:
        out, err = run.communicate(timeout=170)
        assert run.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    skips = [row["skip"] for row in rows if "skip" in row]
    if skips:
        pytest.skip(f"Triton cannot compile for CUDA here: {skips[0]}")
    for row in rows:
        print(f"{row['case']:<30} {row['dtype']} {row['target']} {row['kernel']:<28} regs {row.get('registers')} "
              f"spill {row.get('spill_bytes')} programs {row['programs']} {row['constexprs']}")
    return rows


def test_every_kernel_compiles_for_each_target_and_dtype(compiled):
    errors = [f"{r['case']} {r['dtype']} {r['target']} {r['kernel']}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)
    covered = {(r["kernel"], r["dtype"], r["target"]) for r in compiled}
    assert covered == {(k, d, f"sm_{cc}") for k in KERNELS for d in ("fp32", "fp16", "bf16") for cc in TARGETS}
    assert any(r["constexprs"].get("SCATTER_EMB") for r in compiled)  # the dE scatter variant too
    # embed_scale != 1 (the forward's scaled rows, the scaled dE scatter), in every dtype
    scaled = {(r["kernel"], r["dtype"], r["target"]) for r in compiled if r["constexprs"].get("EMBED_SCALED")}
    assert scaled == {(k, d, f"sm_{cc}") for k in ("dept_fwd_kernel", "dept_bwd_kernel")
                      for d in ("fp32", "fp16", "bf16") for cc in TARGETS}
    # the packed-adapter (one per row) variants of both DePT kernels, in every dtype
    # the grouped prefix launches (three encoders, through the offsets table)
    grouped = {(r["kernel"], r["target"]) for r in compiled if r["case"].endswith("-x3-p200")}
    assert grouped == {(k, f"sm_{cc}") for k in KERNELS if k.startswith("prefix") for cc in TARGETS}
    indexed = {(r["kernel"], r["dtype"], r["target"]) for r in compiled if r["constexprs"].get("INDEXED")}
    assert indexed == {(k, d, f"sm_{cc}") for k in ("dept_fwd_kernel", "dept_bwd_kernel")
                       for d in ("fp32", "fp16", "bf16") for cc in TARGETS}


def test_no_register_spills_in_16bit_configurations(compiled):
    spills = [f"{r['case']} {r['dtype']} {r['target']} {r['kernel']}: {r['spill_bytes']} bytes"
              for r in compiled if r["dtype"] != "fp32" and r.get("spill_bytes")]
    assert not spills, "\n".join(spills)
