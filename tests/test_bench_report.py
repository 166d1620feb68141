"""bench/report.py on synthetic records: the targets' verdicts, the step tables, where it writes (a new
file beside the JSON unless --results names one; the tracked bench/RESULTS.md only when named), and
the RESULTS.md rewrite that must keep every line outside its own block (no GPU or benchmark run needed)."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

import bench_modules


@pytest.fixture(scope="module")
def report():
    return bench_modules.load("report")


def stage(case, mode, provider, ms, device="NVIDIA H100 80GB HBM3", **extra):
    return dict(kind="dept-stage", case=case, mode=mode, provider=provider, ms=ms, device=device, dtype="bf16",
                **extra)


def step(model, method, ms, baseline=None, kind="shared-prompt-step", device="NVIDIA H100 80GB HBM3"):
    return dict(kind=kind, model=model, method=method, ms=ms, baseline=baseline, device=device, trainable=10,
                shape="8 layers d2048")


def verdicts(report, records):
    return {name: verdict for name, verdict, _ in report.targets(records)}


def test_targets_met_not_met_and_not_measured(report):
    big = dict(bytes=3e9, copy_gbps=3000.0, out_bytes=1 << 20)
    records = [
        stage("llama7b-b8-s2048", "forward", "fused", 1.05, **big),        # 95% of the ceiling: within 10%
        stage("llama7b-b64-s512", "forward", "fused", 1.25, **big),        # 80%: not
        stage("t5-base-fp32", "forward", "fused", 1.0), stage("t5-base-fp32", "forward", "compile", 2.5),
        stage("t5-base-bf16", "forward", "fused", 1.0), stage("t5-base-bf16", "forward", "compile", 2.0),
        step("L256-m100-r0", "no-prompt", 10.0), step("L256-m100-r0", "every-row", 14.0, "no-prompt"),
        step("L256-m100-r0", "shared", 10.5, "every-row"),
    ]
    got = verdicts(report, records)
    assert got["DePT forward within 10% of the memory floor on the large shapes"] == "NOT met"
    assert got["DePT forward ≥ 2× faster than torch.compile on the T5-base shape"] == "met"
    assert got["DePT forward+backward ≥ 2× faster than torch.compile on the Llama b64 s512 shape"] == "not measured"
    assert got["Shared-prompt step within 1.1× of the no-prompt step"] == "met"
    assert got["Shared-prompt step ≥ 1.3× faster than the prompt in every row at L 256, m 100"] == "met"
    records[-1] = step("L256-m100-r0", "shared", 11.5, "every-row")  # 1.15x of no-prompt, 1.22x faster than every-row
    got = verdicts(report, records)
    assert got["Shared-prompt step within 1.1× of the no-prompt step"] == "NOT met"
    assert got["Shared-prompt step ≥ 1.3× faster than the prompt in every row at L 256, m 100"] == "NOT met"


def test_cpu_records_judge_nothing(report):
    cpu = [step("L256-m100-r0", m, 1.0, device="CPU (2 threads)") for m in ("no-prompt", "every-row", "shared")]
    assert set(verdicts(report, cpu).values()) == {"not measured"}


def test_step_table_compares_each_method_with_its_baseline(report):
    table = report.step_table([step("m", "no-prompt", 10.0), step("m", "shared", 12.5, "no-prompt")],
                              "shared-prompt-step")
    assert any("| m | shared |" in row and "0.80× vs no-prompt" in row for row in table)  # 10 ms / 12.5 ms


def test_results_md_keeps_what_is_outside_its_block(report, tmp_path):
    records = [step("m", "no-prompt", 10.0, device="CPU (2 threads)")]
    runs = [{"file": "cpu.json", "datetime": "2026-11-23T10:00:00", "versions": {"device": "CPU: test"},
             "command": "pytest bench --benchmark-only"}]
    text = report.new_results() + "\nHand-written notes stay.\n"
    first = report.update_results(text, "cpu", report.block(records, runs, None), runs)
    again = report.update_results(first, "cpu", report.block(records, runs, None), runs)
    assert again == first  # the block is replaced, the run logged once
    assert "Hand-written notes stay." in again and "No GPU run recorded yet" in again
    assert again.count("- 2026-11-23T10:00:00 · CPU: test") == 1
    with pytest.raises(ValueError, match="no '<!-- BEGIN bench.report cpu -->' marker"):
        report.update_results("# empty\n", "cpu", "x", runs)


TRACKED = pathlib.Path(__file__).resolve().parent.parent / "bench" / "RESULTS.md"


def bench_json(path, records, device="CPU: test"):
    data = {"datetime": "2026-11-23T10:00:00", "machine_info": {"dept_fast": {"device": device}},
            "benchmarks": [{"extra_info": record} for record in records]}
    path.write_text(json.dumps(data))
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_main_writes_beside_the_json_and_leaves_the_tracked_results_alone(report, tmp_path, capsys):
    tracked = digest(TRACKED)
    path = bench_json(tmp_path / "cpu.json", [step("m", "no-prompt", 10.0, device="CPU (2 threads)")])
    assert report.main([str(path)]) == 0
    assert digest(TRACKED) == tracked
    text = (tmp_path / "cpu.md").read_text()
    assert "| m | no-prompt |" in text and report.CPU_SMOKE in text and report.NO_CPU_PLOT in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "cpu.md"]  # no plot on CPU, and it says why
    assert report.NO_CPU_PLOT in capsys.readouterr().out


def test_main_updates_the_results_file_it_is_given(report, tmp_path):
    path = bench_json(tmp_path / "cpu.json", [step("m", "no-prompt", 10.0, device="CPU (2 threads)")])
    results = tmp_path / "record" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text(report.new_results() + "\nHand-written notes stay.\n")
    assert report.main([str(path), "--results", str(results)]) == 0
    text = results.read_text()
    assert "| m | no-prompt |" in text and "Hand-written notes stay." in text and "No GPU run recorded yet" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "record"]


def test_a_cuda_run_gets_its_plot_beside_the_report(report, tmp_path):
    pytest.importorskip("matplotlib")
    records = [stage("t5-base-fp32", mode, provider, ms) for mode in ("forward", "backward")
               for provider, ms in (("eager", 2.0), ("compile", 1.5), ("fused", 1.0))]
    path = bench_json(tmp_path / "gpu.json", records, device="NVIDIA H100 80GB HBM3")
    assert report.main([str(path)]) == 0
    assert "![speedups](gpu_speedup_cuda.png)" in (tmp_path / "gpu.md").read_text()
    assert (tmp_path / "gpu_speedup_cuda.png").stat().st_size > 0
    results = tmp_path / "RESULTS.md"
    assert report.main([str(path), "--results", str(results)]) == 0
    assert "![speedups](speedup_cuda.png)" in results.read_text() and (tmp_path / "speedup_cuda.png").exists()


def test_mixed_batch_targets(report):
    def mixed(mode, method, ms, baseline=None):
        return step(mode, method, ms, baseline, kind="mixed-batch-step")

    records = [mixed(mode, "single", 10.0) for mode in ("train-step", "generate")]
    records += [mixed("train-step", "mixed", 11.0, "single"), mixed("train-step", "per-adapter", 40.0, "mixed"),
                mixed("generate", "mixed", 12.0, "single"), mixed("generate", "per-adapter", 30.0, "mixed")]
    got = verdicts(report, records)
    assert got["Mixed-task batch within 1.15× of a single-adapter batch of the same size"] == "NOT met"  # 1.2x
    assert got["Mixed-task batch ≥ 3× faster than one call per adapter"] == "NOT met"  # generate: 2.5x
    records[4:] = [mixed("generate", "mixed", 11.0, "single"), mixed("generate", "per-adapter", 33.0, "mixed")]
    got = verdicts(report, records)
    assert got["Mixed-task batch within 1.15× of a single-adapter batch of the same size"] == "met"
    assert got["Mixed-task batch ≥ 3× faster than one call per adapter"] == "met"
    assert verdicts(report, records[:2])["Mixed-task batch ≥ 3× faster than one call per adapter"] == "not measured"


def test_gpu_session_writes_the_record_and_plot_to_out(tmp_path):
    """bench/gpu_session.sh with a stand-in python: each benchmark step "writes" a CUDA JSON, the report
    step runs for real. $OUT gets RESULTS.md (the tracked one with its CUDA block rewritten) and the
    plot; the tracked bench/RESULTS.md is not touched."""
    pytest.importorskip("matplotlib")
    root = TRACKED.parent.parent
    tracked = digest(TRACKED)
    records = [stage("t5-base-fp32", "forward", provider, ms) for provider, ms in (("eager", 2.0), ("fused", 1.0))]
    fixture = bench_json(tmp_path / "fixture.json", records, device="NVIDIA H100 80GB HBM3")
    stub = tmp_path / "python"
    stub.write_text(f"""#!/bin/sh
case "$*" in
  *bench/report.py*) exec "{sys.executable}" "$@" ;;
esac
for arg in "$@"; do
  case "$arg" in --benchmark-json=*) cp "{fixture}" "${{arg#--benchmark-json=}}" ;; esac
done
""")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(stub), OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_session.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    results = (out / "RESULTS.md").read_text()
    assert "| t5-base-fp32 (bf16) | forward | fused |" in results and "![speedups](speedup_cuda.png)" in results
    assert (out / "speedup_cuda.png").stat().st_size > 0
    assert digest(TRACKED) == tracked and not (root / "bench" / "speedup_cuda.png").exists()


def test_attention_step_target_and_kernels(report):
    """The shared prompt's training step against the plain model's at L 1024 and 2048; the sdpa
    kernels each record ran get a column."""
    def attention(length, method, ms, sdpa="flash x8"):
        record = step(f"L{length} train-step", method, ms, None if method == "no-prompt" else "no-prompt",
                      kind="attention-step")
        return dict(record, sdpa=sdpa)

    name = "Shared-prompt training step within 1.1× of the plain model's at L 1024 and 2048 (8-layer decoder)"
    records = [attention(1024, "no-prompt", 10.0), attention(1024, "shared", 10.5, "flash x16")]
    assert verdicts(report, records)[name] == "not measured"  # L 2048 missing
    records += [attention(2048, "no-prompt", 20.0), attention(2048, "shared", 23.0)]
    assert verdicts(report, records)[name] == "NOT met"  # 1.15x at L 2048
    records[-1] = attention(2048, "shared", 21.0)
    assert verdicts(report, records)[name] == "met"
    table = report.step_table(records, "attention-step")
    assert "sdpa kernels" in table[0] and any("| L1024 train-step | shared |" in row and "flash x16" in row
                                              for row in table)
    assert "sdpa kernels" not in report.step_table([step("m", "no-prompt", 10.0)], "shared-prompt-step")[0]
