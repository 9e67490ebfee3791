#!/usr/bin/env bash
# One GPU session (H100/H200 lent for minutes): kernels, then train steps, then a CLI run.
# Run from the repo root on the GPU machine:  bash benchmarks/gpu_session.sh [kernels|steps|all]
# Needs .gpu/whl (grain wheels) and .gpu/tinystories (the data); see BUILD.md "Measuring on a GPU".
set -u
export PYTHONUNBUFFERED=1
WHAT=${1:-all}
OUT=${OUT:-/tmp/dsjax-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

if [[ $WHAT == kernels || $WHAT == all ]]; then
  timeout 150 python3 benchmarks/gpu_attention.py 2>&1 | tee "$OUT/attention.log" | tail -40
  timeout 150 python3 benchmarks/gpu_moe.py 2>&1 | tee "$OUT/moe.log" | tail -30
fi
if [[ $WHAT == steps || $WHAT == all ]]; then
  B=(python3 -m dsjax bench --json --results "$OUT/bench.jsonl" --keep-going --steps 20 --warmup 3 --gpus 1)
  timeout 120 "${B[@]}" --model-size tiny --moe dense,pallas 2>&1 | tail -4
  timeout 240 "${B[@]}" --model-size small --moe dense,pallas --attention xla,cudnn,pallas 2>&1 | tail -8
fi
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
from dsjax.bench import format_table
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    rows = []
print(format_table(rows))
PY
