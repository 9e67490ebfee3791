#!/usr/bin/env bash
# One GPU session (an H100/H200 lent for minutes): kernels, then train steps, then a CLI run.
# From the repo root on the GPU machine:  bash benchmarks/gpu_session.sh [kernels] [steps] [memory] [cli]
# Needs .gpu/whl (grain's wheels), .gpu/tinystories (the data) and .gpu/vocab8k.json; see BUILD.md.
set -u
export PYTHONUNBUFFERED=1
PARTS=${*:-kernels steps}
OUT=${OUT:-/tmp/dsjax-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
B=(python3 -m dsjax bench --json --results "$OUT/bench.jsonl" --keep-going --steps 20 --warmup 3 --gpus 1)
for part in $PARTS; do
  echo "=== $part $(date +%T)"
  case $part in
    kernels)
      timeout 90 python3 benchmarks/gpu_attention.py --total-s 60 > "$OUT/attention.log" 2>&1; tail -25 "$OUT/attention.log"
      timeout 110 python3 benchmarks/gpu_moe.py > "$OUT/moe.log" 2>&1; tail -25 "$OUT/moe.log" ;;
    steps)
      timeout 70 "${B[@]}" --model-size tiny --moe dense,pallas > "$OUT/steps_tiny.log" 2>&1
      timeout 60 "${B[@]}" --model-size tiny --batch-size 16 --grad-accum 1 --moe dense >> "$OUT/steps_tiny.log" 2>&1
      timeout 170 "${B[@]}" --model-size small --moe dense --attention xla,cudnn > "$OUT/steps_small.log" 2>&1
      timeout 100 "${B[@]}" --model-size small --moe pallas --attention pallas >> "$OUT/steps_small.log" 2>&1
      grep -h "error\|Error" "$OUT"/steps_*.log | tail -5 ;;
    memory)
      timeout 200 "${B[@]}" --steps 5 --model-size small --batch-size 64 --seq-len 1024 --moe pallas --attention pallas --remat none,save_dots > "$OUT/memory.log" 2>&1 ;;
    cli)
      rm -rf /tmp/cli && mkdir -p /tmp/cli
      /usr/bin/time -v timeout 150 python3 -m dsjax run --model-size tiny --config .gpu/vocab8k.json --max-steps 3000 \
        --data-dir .gpu/tinystories --work-dir /tmp/cli/data --checkpoint-dir /tmp/cli/ck --output-dir /tmp/cli/out \
        --log-interval 500 --eval-interval 1000 > "$OUT/cli.log" 2>&1; grep -E "step 3000|Elapsed|done|error" "$OUT/cli.log" | tail -6 ;;
  esac
done
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
from dsjax.bench import format_table
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    rows = []
print(format_table(rows))
PY
