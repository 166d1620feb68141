"""Turn pytest-benchmark JSON from ``pytest bench --benchmark-only`` into a markdown report and a plot.

    pytest bench --benchmark-only --benchmark-json=bench.json
    python -m bench.report bench.json [more.json ...]                 # -> bench.md (+ bench_speedup_cuda.png)
    python -m bench.report bench.json --results bench/RESULTS.md      # update the tracked record

The records are the ``extra_info`` that ``bench/measure.py`` writes (its docstring says what
each number means). By default the report is a new file beside the first JSON, named after it
(``bench.md``), and touches nothing else. ``--results FILE`` instead updates a RESULTS.md (the
tracked ``bench/RESULTS.md`` only when it is named): the file keeps one generated block per device
type (cuda, cpu); a report rewrites the block of its runs' device type, adds a line per run to the
run log, and keeps every other line of the file as it was.

One ratio direction everywhere: a speedup is the baseline's ms over the row's ms, above 1× when
the row is faster. The plot (CUDA runs only, beside the report: ``bench_speedup_cuda.png``, or
``speedup_cuda.png`` beside RESULTS.md) shows the speedup of the fused stage over each baseline,
by shape and mode. CPU runs get no plot, and the report says why (:data:`NO_CPU_PLOT`).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

BASELINES = ("eager", "compile")
_MODE_ORDER = {"forward": 0, "backward": 1, "forward+backward": 2}
MIB = 1 << 20
RUN_LOG_BEGIN, RUN_LOG_END = "<!-- BEGIN run log -->", "<!-- END run log -->"
TEMPLATE = f"""# Benchmark results

Written by `python -m bench.report FILE.json --results bench/RESULTS.md` from the JSON of
`pytest bench --benchmark-only --benchmark-json=FILE.json` (without `--results` the report goes to a
new file beside the JSON). Each device type has one generated block, rewritten by the next report of
that type; everything outside the blocks is kept. How every number is measured: `bench/measure.py`.
Every ratio is a speedup: the baseline's ms / the row's ms, above 1× when the row is faster.

## GPU (CUDA)

{{cuda}}

## CPU

{{cpu}}

## Run log

{RUN_LOG_BEGIN}
{RUN_LOG_END}
"""
NO_RUN = {
    "cuda": "No GPU run recorded yet: there are no GPU numbers. On a CUDA machine run "
            "`OUT=<folder> bash bench/gpu_session.sh`, then copy `RESULTS.md` and "
            "`speedup_cuda.png` from that folder into `bench/`.",
    "cpu": "No CPU run recorded yet. Run `pytest bench --benchmark-only --benchmark-json=cpu.json` "
           "then `python -m bench.report cpu.json --results bench/RESULTS.md`.",
}
SPEEDUP = "Speedup (× vs …): the baseline's ms / this row's ms; above 1× this row is faster than the baseline."
CPU_SMOKE = ("CPU smoke run: it checks that the benchmark suites run without a GPU; its times and ratios are "
             "not performance. The fused kernels and torch.compile are timed on CUDA only, so the stage rows "
             "compare the eager reference with the library's CPU path (the same PyTorch reference behind the "
             "module's checks); stage cases run in float32 and model shapes are scaled down; on a shared "
             "CPU the same ratio moves several-fold from run to run.")
NO_CPU_PLOT = ("No plot for a CPU run: the plot shows the fused kernels' speedup over eager and torch.compile, "
               "which are timed on CUDA only; on CPU both stage providers run the same PyTorch reference, so "
               "their ratio is noise.")


# ---------------------------------------------------------------------------------------------
# Loading
def load(paths: Iterable[str]) -> Tuple[List[Dict], List[Dict]]:
    """Records (the measure() dicts) and runs (date, versions, command, file) from JSON files."""
    records, runs = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        records += [b["extra_info"] for b in data.get("benchmarks", []) if "kind" in b.get("extra_info", {})]
        runs.append({"file": os.path.basename(path), "datetime": data.get("datetime", "?"),
                     "versions": data.get("machine_info", {}).get("dept_fast", {}),
                     "command": data.get("dept_fast", {}).get("command", "?")})
    return records, runs


# ---------------------------------------------------------------------------------------------
# Derived numbers
def device_type(record: Dict) -> str:
    return "cpu" if record["device"].startswith("CPU") else "cuda"


def gbps(record: Dict) -> Optional[float]:
    if record.get("bytes") is None or not record.get("ms"):
        return None
    return record["bytes"] / record["ms"] / 1e6


def floor_pct(record: Dict) -> Optional[float]:
    """Achieved bandwidth as % of the measured copy ceiling (100% = at the memory floor)."""
    rate = gbps(record)
    return 100 * rate / record["copy_gbps"] if rate and record.get("copy_gbps") else None


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def stage_groups(records: List[Dict]) -> Dict[Tuple[str, str, str], Dict[str, Dict]]:
    """(kind, case, mode) -> provider -> record, for the "*-stage" kinds, in measured order."""
    groups = defaultdict(dict)
    for r in records:
        if r["kind"].endswith("-stage"):
            groups[(r["kind"], r["case"], r["mode"])][r["provider"]] = r
    return groups


def step_groups(records: List[Dict], kind: str) -> Dict[str, Dict[str, Dict]]:
    """model -> method -> record for one "*-step" kind."""
    groups = defaultdict(dict)
    for r in records:
        if r["kind"] == kind:
            groups[r["model"]][r["method"]] = r
    return groups


def speedup(group: Dict[str, Dict], provider: str, baseline: str) -> Optional[float]:
    """How many times faster ``provider`` ran than ``baseline`` in one (case, mode) group."""
    base, r = group.get(baseline), group.get(provider)
    return _ratio(base and base.get("ms"), r and r.get("ms"))


# ---------------------------------------------------------------------------------------------
# Tables
def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def stage_table(records: List[Dict], kind: str) -> List[str]:
    """One stage kind ("dept-stage", "prefix-stage"): every provider of every (case, mode)."""
    header = ["case (dtype)", "mode", "provider", "ms", "GB/s", "% of copy ceiling", "× vs eager", "× vs compile",
              "peak extra MiB", "peak extra / output"]
    rows = []
    for (k, case, mode), group in stage_groups(records).items():
        if k != kind:
            continue
        for provider, r in group.items():
            extra = r.get("peak_extra_bytes")
            rows.append([f"{case} ({r['dtype']})", mode, provider, _fmt(r.get("ms"), ".4g"), _fmt(gbps(r), ".3g"),
                         _fmt(floor_pct(r), ".0f", "%"), _fmt(speedup(group, provider, "eager"), ".2f"),
                         _fmt(speedup(group, provider, "compile"), ".2f"),
                         _fmt(extra and extra / MIB, ".1f"), _fmt(_ratio(extra, r.get("out_bytes")), ".2f")])
    return _table(header, rows)


def step_table(records: List[Dict], kind: str) -> List[str]:
    """One model-level kind ("*-step"): time, memory and speed against each record's baseline."""
    by_model = step_groups(records, kind)
    kernels = any(r.get("sdpa") for methods in by_model.values() for r in methods.values())
    header = ["model", "method", "trainable", "step ms", "speedup vs baseline", "peak extra MiB", "embedding stage ms",
              "stage % of step"] + (["sdpa kernels"] if kernels else [])
    rows, shapes = [], []
    for model, methods in by_model.items():
        shapes.append(f"- {model}: {next(iter(methods.values()))['shape']}")
        for method, r in methods.items():
            base = methods.get(r.get("baseline"))
            extra = r.get("peak_extra_bytes")
            share = _ratio(r.get("stage_ms"), r.get("ms"))
            rows.append([model, method, f"{r['trainable']:,}", _fmt(r.get("ms"), ".4g"),
                         _fmt(_ratio(base and base.get("ms"), r.get("ms")), ".2f", f"× vs {r.get('baseline')}"),
                         _fmt(extra and extra / MIB, ".0f"), _fmt(r.get("stage_ms"), ".4g"),
                         _fmt(share and 100 * share, ".2f", "%")] + ([r.get("sdpa") or "–"] if kernels else []))
    return _table(header, rows) + [""] + shapes


# ---------------------------------------------------------------------------------------------
# The H100 targets, judged from CUDA records only
def targets(records: List[Dict]) -> List[Tuple[str, str, str]]:
    """(target, verdict, evidence) for each target; verdict is met / NOT met / not measured."""
    cuda = [r for r in records if device_type(r) == "cuda"]
    groups = {k[1:]: g for k, g in stage_groups(cuda).items() if k[0] == "dept-stage"}
    out = []

    def judge(name: str, checks: List[Tuple[str, Optional[bool]]]):
        if not checks or any(ok is None for _, ok in checks):
            out.append((name, "not measured", "; ".join(text for text, ok in checks) or "no CUDA records"))
        else:
            out.append((name, "met" if all(ok for _, ok in checks) else "NOT met", "; ".join(t for t, _ in checks)))

    checks = []
    for case in ("llama7b-b8-s2048", "llama7b-b64-s512"):
        r = groups.get((case, "forward"), {}).get("fused")
        pct = r and floor_pct(r)
        checks.append((f"{case}: {_fmt(pct, '.1f', '%')} of the copy ceiling",
                       None if pct is None else pct >= 100 / 1.1))  # time <= 1.1 x floor
    judge("DePT forward within 10% of the memory floor on the large shapes", checks)

    def faster(case, mode, factor):
        x = speedup(groups.get((case, mode), {}), "fused", "compile")
        return f"{case} {mode}: fused vs compile {_fmt(x, '.2f', '×')}", None if x is None else x >= factor

    judge("DePT forward ≥ 2× faster than torch.compile on the T5-base shape",
          [faster(c, "forward", 2) for c in ("t5-base-fp32", "t5-base-bf16")])
    judge("DePT forward+backward ≥ 2× faster than torch.compile on the Llama b64 s512 shape",
          [faster("llama7b-b64-s512", "forward+backward", 2)])
    checks = []
    for (case, mode), group in groups.items():
        r = group.get("fused")
        if mode == "forward" and r and r.get("peak_extra_bytes") is not None:
            allowed = -(-r["out_bytes"] // 512) * 512  # the caching allocator rounds to 512 bytes
            checks.append((f"{case}: {r['peak_extra_bytes']:,} B vs output {r['out_bytes']:,} B",
                           r["peak_extra_bytes"] <= allowed))
    judge("Peak extra memory of the fused forward = the output tensor alone", checks)

    def step_speedup(kind, model, method, baseline, at_least):
        """``method``'s speedup over ``baseline`` (baseline ms / method ms) must be >= ``at_least``."""
        methods = step_groups(cuda, kind).get(model, {})
        x = _ratio(methods.get(baseline, {}).get("ms"), methods.get(method, {}).get("ms"))
        text = f"{model}: {method} vs {baseline} {_fmt(x, '.2f', '×')} (needs ≥ {at_least:.2f}×)"
        return text, None if x is None else x >= at_least

    shared = "shared-prompt-step"
    judge("Shared-prompt step within 1.1× of the no-prompt step",  # its time: speedup >= 1 / 1.1
          [step_speedup(shared, model, "shared", "no-prompt", 1 / 1.1) for model in step_groups(cuda, shared)])
    judge("Shared-prompt step ≥ 1.3× faster than the prompt in every row at L 256, m 100",
          [step_speedup(shared, "L256-m100-r0", "shared", "every-row", 1.3)])
    judge("Shared-prompt training step within 1.1× of the plain model's at L 1024 and 2048 (8-layer decoder)",
          [step_speedup("attention-step", f"L{length} train-step", "shared", "no-prompt", 1 / 1.1)
           for length in (1024, 2048)])
    mixed, modes = "mixed-batch-step", ("train-step", "generate")
    judge("Mixed-task batch within 1.15× of a single-adapter batch of the same size",
          [step_speedup(mixed, mode, "mixed", "single", 1 / 1.15) for mode in modes])
    judge("Mixed-task batch ≥ 3× faster than one call per adapter",
          [step_speedup(mixed, mode, "mixed", "per-adapter", 3) for mode in modes])
    return out


def summary_lines(records: List[Dict]) -> List[str]:
    """The markdown tables (and, for CUDA, the targets) of a set of records."""
    lines = []
    timers = sorted({r["timer"] for r in records if r.get("timer")})
    lines.append(f"ms: {'; '.join(timers)}. Devices: {', '.join(sorted({r['device'] for r in records}))}.")
    lines.append(SPEEDUP)
    for kind in dict.fromkeys(r["kind"] for r in records):
        table = stage_table(records, kind) if kind.endswith("-stage") else step_table(records, kind)
        lines += ["", f"**{kind}**", ""] + table
    notes = sorted({r["note"] for r in records if r.get("note")})
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    if any(device_type(r) == "cuda" for r in records):
        lines += ["", "Targets (H100):", ""]
        lines += _table(["target", "verdict", "evidence"], [list(t) for t in targets(records)])
    return lines


# ---------------------------------------------------------------------------------------------
# Plot
def plot(records: List[Dict], path: str, title: str) -> bool:
    """Speedup of the fused stage over each baseline, by shape and mode (CUDA records: on CPU the
    fused kernels and torch.compile are not timed, and the module and eager providers run the
    same reference, so a CPU "speedup" would be noise)."""
    groups = stage_groups(records)
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    kinds = sorted({kind for kind, _, _ in groups})
    modes = sorted({mode for _, _, mode in groups}, key=lambda m: _MODE_ORDER.get(m, 9))
    fig, axes = plt.subplots(len(kinds), len(modes), figsize=(5 * len(modes), 4 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        for ax, mode in zip(row, modes):
            cases = [c for k, c, m in groups if (k, m) == (kind, mode)]
            target = "fused" if any("fused" in groups[(kind, c, mode)] for c in cases) else "module"
            width = 0.8 / len(BASELINES)
            for i, base in enumerate(BASELINES):
                values = [speedup(groups[(kind, c, mode)], target, base) for c in cases]
                if any(values):
                    xs = [x + (i - (len(BASELINES) - 1) / 2) * width for x in range(len(cases))]
                    # Bars grow from 1x: up when faster than the baseline, down when slower.
                    bars = ax.bar(xs, [v - 1 if v else 0 for v in values], width, bottom=1.0,
                                  label=f"{target} vs {base}")
                    ax.bar_label(bars, labels=[f"{v:.3g}" if v else "" for v in values], fontsize=7)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{kind}: {mode}", fontsize=10)
            ax.set_ylabel("speedup (log scale; above 1× is faster)")
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# RESULTS.md
def _markers(kind: str) -> Tuple[str, str]:
    return f"<!-- BEGIN bench.report {kind} -->", f"<!-- END bench.report {kind} -->"


def block(records: List[Dict], runs: List[Dict], plot_name: Optional[str]) -> str:
    """The generated markdown for one device type."""
    dev = device_type(records[0])
    lines = []
    for run in runs:
        v = run["versions"]
        lines.append(f"Run {run['datetime']} on **{v.get('device', '?')}**: torch {v.get('torch')}, "
                     f"triton {v.get('triton')}, transformers {v.get('transformers')}, CUDA {v.get('cuda')}, "
                     f"{v.get('cpu_threads')} CPU threads. Command: `{run['command']}`.")
    if dev == "cpu":
        lines += ["", CPU_SMOKE]
    lines += [""] + summary_lines(records)
    if plot_name:
        lines += ["", f"![speedups]({plot_name})"]
    elif dev == "cpu":
        lines += ["", NO_CPU_PLOT]
    return "\n".join(lines)


def update_results(text: str, dev: str, generated: str, runs: List[Dict]) -> str:
    """Replace ``dev``'s block in RESULTS.md text and log the runs; everything else is kept."""
    begin, end = _markers(dev)
    if begin not in text:
        raise ValueError(f"RESULTS.md has no '{begin}' marker; restore it or delete the file to start afresh")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{generated}\n{end}{tail}"
    log_head, log_rest = text.split(RUN_LOG_END, 1)
    for run in runs:
        line = (f"- {run['datetime']} · {run['versions'].get('device', '?')} · `{run['command']}` · "
                f"{run['file']}")
        if line not in log_head:
            log_head += line + "\n"
    return log_head + RUN_LOG_END + log_rest


def new_results() -> str:
    """RESULTS.md with no run recorded."""
    blocks = {}
    for dev, text in NO_RUN.items():
        begin, end = _markers(dev)
        blocks[dev] = f"{begin}\n{text}\n{end}"
    return TEMPLATE.format(**blocks)


def standalone(generated: str, dev: str, paths: List[str]) -> str:
    """A report of one run (or a few of one device type), on its own, for the default output file."""
    command = " ".join(["python -m bench.report", *(os.path.basename(p) for p in paths)])
    return (f"# Benchmark report\n\nWritten by `{command}`; how every number is measured: `bench/measure.py`. "
            f"The tracked record is `bench/RESULTS.md`, updated only with `--results bench/RESULTS.md`.\n\n"
            f"## {'GPU (CUDA)' if dev == 'cuda' else 'CPU'}\n\n{generated}\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files of one device type")
    parser.add_argument("--results", help="a RESULTS.md to update (e.g. bench/RESULTS.md, the tracked record); "
                                          "default: write a new report beside the first JSON, named after it")
    args = parser.parse_args(argv)

    records, runs = load(args.json)
    if not records:
        parser.error(f"no dept_fast benchmark records in {', '.join(args.json)}")
    devs = {device_type(r) for r in records}
    if len(devs) != 1:
        parser.error(f"records from several device types ({', '.join(sorted(devs))}): report each separately")
    dev = devs.pop()
    if args.results:
        report_path = args.results
        plot_name = f"speedup_{dev}.png"
    else:
        stem = os.path.splitext(os.path.abspath(args.json[0]))[0]
        report_path, plot_name = f"{stem}.md", f"{os.path.basename(stem)}_speedup_{dev}.png"
    plot_path = os.path.join(os.path.dirname(os.path.abspath(report_path)), plot_name)  # linked by its name
    title = f"{records[0]['device']} · {', '.join(run['datetime'][:10] for run in runs)}"
    if dev != "cuda" or not plot(records, plot_path, title):
        plot_name = None
    generated = block(records, runs, plot_name)
    if args.results:
        text = open(report_path, encoding="utf-8").read() if os.path.exists(report_path) else new_results()
        text = update_results(text, dev, generated, runs)
    else:
        text = standalone(generated, dev, args.json)
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {report_path}" + (f" and {plot_path}" if plot_name else ""))
    if dev == "cpu":
        print(NO_CPU_PLOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
