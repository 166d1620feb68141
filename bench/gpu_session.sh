#!/usr/bin/env bash
# One GPU session, in under 10 minutes: the test suite on CUDA, the benchmarks, the report.
#
#   OUT=<folder> bash bench/gpu_session.sh        # from the repository root
#
# Needs a CUDA machine with torch, triton, transformers, pytest, pytest-benchmark and matplotlib
# installed. Installs this checkout and nothing else (`pip install --no-deps --no-build-isolation
# -e .`, offline). Never put the checkout root on PYTHONPATH: there its top-level kernels/ folder
# answers to `import kernels`, the name of a PyPI package that transformers probes for and imports
# (without triton that import fails, and `from transformers import ...` with it). Installed, the
# folder is `dept_fast.kernels` only. Everything it produces goes to $OUT (6 files):
#   gpu_session.log      all output, step by step
#   bench_stage.json     pytest-benchmark JSON of the stage suites (bench/test_*stage*.py)
#   bench_model.json     pytest-benchmark JSON of the model-level suites (every other bench/ suite but
#                        the next)
#   bench_attention.json pytest-benchmark JSON of bench/test_attention_step.py (the whole model on the
#                        prefix attention at L 1024 and 2048, the sdpa kernels each record ran)
#   RESULTS.md           a copy of bench/RESULTS.md with its CUDA block rewritten from those files
#   speedup_cuda.png     the plot RESULTS.md shows
#   (VLLM=1: vllm_throughput.json only, see below)
# No tracked file of the checkout is written. Copy RESULTS.md and speedup_cuda.png into bench/ and
# commit them. Each step has a time limit; a step that reaches it gets SIGINT, so pytest still writes
# the JSON of what it measured.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the logs and results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # on the device machines the python3 on PATH is the one with torch
unset TRITON_INTERPRET  # compiled kernels only: interpreter timings are meaningless
LOG="$OUT/gpu_session.log"
# Every step runs in an empty folder: `python -m` and `python -` put the working directory first on
# sys.path (and a relative PYTHONPATH entry such as `.` resolves against it), so not the checkout root.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $(date -u +%FT%TZ) $name: $* (limit ${limit}s)" | tee -a "$LOG"
    (cd "$SCRATCH" && timeout -s INT -k 20 "$limit" "$@") 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" -eq 124 ] && why=" = time limit reached, interrupted by SIGINT"
    echo "=== $name exit $rc$why" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc$why)")
}

# Limits add up to 570 s (+20 s grace per interrupted step) for a 600 s device command. No GPU run has
# measured these steps yet: the limits are estimates, and a step that overruns keeps what it measured.
step install 25 "$PY" -m pip install --no-deps --no-build-isolation --no-input -q -e "$ROOT"
step environment 25 "$PY" - "$ROOT" <<'EOF'
import importlib.util, os, subprocess, sys
import torch, triton, transformers
import dept_fast
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| CUDA", torch.version.cuda, "| dept_fast in",
      os.path.dirname(dept_fast.__file__))
kernels = importlib.util.find_spec("kernels")
if kernels is not None and (kernels.origin or "").startswith(os.path.join(sys.argv[1], "")):
    sys.exit(f"`import kernels` finds {kernels.origin}: take the checkout root off PYTHONPATH")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for a GPU machine")
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
EOF
if [ ${#failed[@]} -ne 0 ]; then echo "install or environment check failed; stopping" | tee -a "$LOG"; exit 1; fi

# vLLM serving throughput (bench/vllm_throughput.py) needs vLLM, which lives in an environment of its
# own (docs/serving.md), and an engine start of about a minute: no room within this session's limits.
# `VLLM=1 OUT=<folder> bash bench/gpu_session.sh` runs it alone (after install and environment), writing
# $OUT/vllm_throughput.json; without vLLM importable that step is skipped, and so by default.
has_vllm() { (cd "$SCRATCH" && "$PY" -c "import vllm") > /dev/null 2>&1; }
if [ "${VLLM:-0}" = 1 ]; then
    if has_vllm; then
        step vllm-throughput 500 "$PY" "$ROOT/bench/vllm_throughput.py" --requests 256 --input-len 256 \
            --new-tokens 64 --hidden 2048 --layers 16 --out "$OUT/vllm_throughput.json"
    else
        echo "=== vllm-throughput skipped: vllm is not importable by $PY" | tee -a "$LOG"
    fi
    echo "=== $(date -u +%FT%TZ) done; failed steps: ${failed[*]:-none}" | tee -a "$LOG"
    [ ${#failed[@]} -eq 0 ]
    exit
fi
has_vllm && echo "=== vLLM is importable: VLLM=1 runs its throughput bench" | tee -a "$LOG"

# What needs the GPU: the gpu-marked tests, then the kernel parity suites, whose device fixture is
# CUDA here (compiled kernels instead of the interpreter). CI runs everything else on CPU.
step gpu-tests 85 "$PY" -m pytest "$ROOT/tests" -q -p no:cacheprovider -m gpu
step parity 40 "$PY" -m pytest "$ROOT/tests/test_dept_parity.py" "$ROOT/tests/test_mixed_parity.py" \
    "$ROOT/tests/test_prefix_kv_parity.py" "$ROOT/tests/test_prefix_kv_grouped.py" -q -p no:cacheprovider

# Stage suites are the bench/ tests whose names contain "stage"; all others are model-level.
BENCH=("$PY" -m pytest "$ROOT/bench" --benchmark-only -q -p no:cacheprovider --benchmark-max-time=0.2
       --benchmark-columns=min,median,max,rounds --benchmark-sort=name)
step bench-stage 125 "${BENCH[@]}" -k stage --benchmark-json="$OUT/bench_stage.json"
# Model-level: test_model_step.py, test_shared_prompt_step.py, test_prefix_peft_step.py,
# test_mixed_batch_step.py, test_prompt_reuse.py (36 records).
step bench-model 180 "${BENCH[@]}" -k "not stage and not attention_step" --benchmark-json="$OUT/bench_model.json"
# The 8-layer decoder at L 1024 and 2048: no prompt, shared prompt, prefix, PEFT prompt tuning; a
# training step and generate() of 64 tokens (16 records).
step bench-attention 60 "${BENCH[@]}" -k attention_step --benchmark-json="$OUT/bench_attention.json"

jsons=()
for f in "$OUT/bench_stage.json" "$OUT/bench_model.json" "$OUT/bench_attention.json"; do
    [ -s "$f" ] && jsons+=("$f")
done
if [ ${#jsons[@]} -ne 0 ]; then
    # The tracked record is copied and the copy updated (the plot lands beside it), in $OUT.
    cp "$ROOT/bench/RESULTS.md" "$OUT/RESULTS.md"
    step report 30 "$PY" "$ROOT/bench/report.py" "${jsons[@]}" --results "$OUT/RESULTS.md"
else
    failed+=("report (no benchmark JSON was written)")
fi

echo "=== $(date -u +%FT%TZ) done; failed steps: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} -eq 0 ]
