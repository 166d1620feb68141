#!/usr/bin/env bash
# DeepSpeed ZeRO-3 parity on 2 CPU processes (gloo): installs the optional deepspeed package into
# the active environment and runs tests/test_deepspeed.py (.ci/run installs it too).
# The first run compiles DeepSpeed's CPU communication op deepspeed_shm_comm (~2.5 min on 2 cores,
# then cached under ~/.cache/torch_extensions); the tests themselves take ~1.5 min.
#     . .venv/bin/activate && bash tests/deepspeed_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "deepspeed==0.19.8"
pytest -p no:cacheprovider -m deepspeed tests/test_deepspeed.py "$@"
