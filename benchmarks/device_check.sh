#!/usr/bin/env bash
# The GPU check: every GPU-marked test, then the BP, learned-model and sampling benchmarks on the GPU.
#
#   bash benchmarks/device_check.sh            # from the repository root, on a machine with a CUDA GPU
#   PYTHON=/path/to/python bash benchmarks/device_check.sh
#
# Needs a CUDA build of torch (constraints.txt pins the CPU build: install the matching CUDA wheel of
# the same version into the venv first). Refuses to start without nvidia-smi, a visible GPU, or with a
# CPU build of torch. Each stage has its own time limit, so the whole check ends within 8 minutes;
# a stage that fails or runs out of time is recorded and the next one still runs.
#
# Writes to benchmarks/results/ (the CPU results are left alone):
#   device_check.json           GPU, torch, every stage's status and seconds
#   device_check_pytest.txt     the output of `pytest -m gpu`
#   bp_cuda.json                benchmarks/bench_bp.py --device cuda --quick
#   models_cuda.json            benchmarks/bench_models.py --device cuda --quick
#   sampling_cuda.json          benchmarks/bench_sampling.py --device cuda (1000 samples x 100 steps)
# Exit status: 0 when every stage passed, 1 when one failed, 2 when there is no usable GPU.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3 || true)"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

fail() { echo "device_check: $*" >&2; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi on PATH: this check needs a machine with an NVIDIA GPU (nothing was run)"
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no GPU (driver not loaded, or no device visible; check CUDA_VISIBLE_DEVICES)"
[ -n "$PYTHON" ] || fail "no python: create the venv (make test) or set PYTHON"
"$PYTHON" - <<'EOF' || exit 2
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"device_check: torch {torch.__version__} is a CPU build: install the CUDA build of the same version")
if not torch.cuda.is_available():
    sys.exit(f"device_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: torch.cuda.is_available() is False")
print(f"device_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

export HF_HUB_OFFLINE=1
STAGES=()
run_stage() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS status
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    local took=$((SECONDS - start))
    case $status in
        0) echo "== $name: passed in ${took}s" ;;
        124|137) echo "== $name: TIMED OUT after ${took}s" ;;
        *) echo "== $name: FAILED (exit $status) after ${took}s" ;;
    esac
    STAGES+=("$name:$status:$took")
}

# 1. every GPU-marked test (BP on CUDA, CUDA resume, bf16/fp16 autocast, compiled training): <= 210 s
run_stage pytest_gpu 210 bash -o pipefail -c "'$PYTHON' -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee '$RESULTS/device_check_pytest.txt'"
# 2. exact BP on the GPU, the four cases and the scaling rows: <= 90 s
run_stage bench_bp 90 "$PYTHON" benchmarks/bench_bp.py --device cuda --quick --out "$RESULTS/bp_cuda.json"
# 3. learned models' forward and training steps on the GPU (and the train() loop): <= 90 s
run_stage bench_models 90 "$PYTHON" benchmarks/bench_models.py --device cuda --quick --out "$RESULTS/models_cuda.json"
# 4. oracle sampling, 1000 samples x 100 steps, three noise processes: <= 60 s
run_stage bench_sampling 60 "$PYTHON" benchmarks/bench_sampling.py --device cuda --out "$RESULTS/sampling_cuda.json"

STAGES_TEXT="${STAGES[*]}" "$PYTHON" - <<'EOF'
import os
import sys

import torch

sys.path.insert(0, "benchmarks")
from _common import machine_info, write_result

stages = []
for item in os.environ["STAGES_TEXT"].split():
    name, status, seconds = item.split(":")
    status = int(status)
    stages.append({"stage": name, "exit_status": status, "seconds": int(seconds),
                   "result": "passed" if status == 0 else "timed out" if status in (124, 137) else "failed"})
write_result("benchmarks/results/device_check.json", {
    "check": "benchmarks/device_check.sh: pytest -m gpu, then bench_bp / bench_models / bench_sampling --device cuda",
    "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "stages": stages,
    "all_passed": all(s["exit_status"] == 0 for s in stages),
    "machine": machine_info(),
})
EOF

for s in "${STAGES[@]}"; do
    [ "$(echo "$s" | cut -d: -f2)" = 0 ] || { echo "device_check: some stages failed: ${STAGES[*]}" >&2; exit 1; }
done
echo "device_check: all stages passed (${SECONDS}s): ${STAGES[*]}"
