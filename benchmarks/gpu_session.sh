#!/usr/bin/env bash
# One GPU session (an H100/H200 lent for minutes): kernels, then train steps, then a CLI run.
# From the repo root on the GPU machine:  bash benchmarks/gpu_session.sh [kernels] [steps] [profile] [tiny] [xlaflags] [smallprofile] [headgrad] [generate] [memory] [cli]
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
# one line per JSON row of `dsjax bench --json` on stdin: case, compile s, ms/step, back-to-back ms/step, peak GiB
rows() { python3 -c "
import json, sys
for line in sys.stdin:
    if line.startswith('{'):
        r = json.loads(line)
        print(r['case'], '| compile', r.get('compile_sec'), '| ms/step', r.get('step_ms_median'), '| back to back',
              r.get('back_to_back_ms_per_step'), '| GiB', r.get('peak_memory_gib'), r.get('error', ''))"; }
B=(python3 -m dsjax bench --json --results "$OUT/bench.jsonl" --keep-going --steps 20 --warmup 3 --gpus 1)
for part in $PARTS; do
  echo "=== $part $(date +%T)"
  case $part in
    kernels)  # the backward-tiling sweep, then the cases not yet measured
      timeout 60 python3 benchmarks/gpu_attention.py --sweep --cases small:8192 --total-s 10 > "$OUT/attention.log" 2>&1
      grep -E "sweep|small .*8192|error" "$OUT/attention.log" | tail -14
      timeout 90 python3 benchmarks/gpu_moe.py --sweep --budget-s 0.5 > "$OUT/moe.log" 2>&1
      grep -vE "^\s|Traceback|^jax" "$OUT/moe.log" | cut -c1-220 | tail -22 ;;
    steps)
      timeout 35 "${B[@]}" --model-size tiny --moe pallas > "$OUT/steps_tiny.log" 2>&1
      timeout 85 "${B[@]}" --model-size small --moe pallas --attention cudnn,pallas > "$OUT/steps_small.log" 2>&1 ;;
    profile)  # where tiny's step goes at the guide's batch and as one batch: kernels and busy time vs wall
      for shape in "--batch-size 4 --grad-accum 4" "--batch-size 16 --grad-accum 1"; do
        timeout 45 "${B[@]}" --steps 5 --warmup 2 --model-size tiny --moe pallas --attention cudnn $shape \
          --profile /tmp/dsjax-profile >> "$OUT/profile.log" 2>&1
      done
      grep -vE "^\{|^appended" "$OUT/profile.log" | cut -c1-200 | tail -50 ;;
    tiny)  # accumulation scan vs fold (each step waited for, and back to back); then kernels without CUDA graphs
      # the GEMM autotuning results go to $OUT, for benchmarks/gpu_kernels.py's deviceless counts (XLA_FLAGS
      # --xla_gpu_load_autotune_results_from=...) to use the tilings the GPU picked
      XLA_FLAGS=--xla_gpu_dump_autotune_results_to="$OUT/autotune_tiny.textproto" \
        timeout 60 "${B[@]}" --model-size tiny --moe pallas --attention cudnn --accumulation scan,fold > "$OUT/tiny.log" 2>&1
      rows < "$OUT/tiny.log"
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 45 "${B[@]}" --steps 5 --warmup 2 --model-size tiny --moe pallas \
        --attention cudnn --accumulation fold --profile /tmp/dsjax-profile-nocb >> "$OUT/tiny.log" 2>&1
      grep -vE "^\{|^appended" "$OUT/tiny.log" | cut -c1-200 | tail -40 ;;
    xlaflags)  # compile time against step time under XLA's gemm autotuning flags (run 4: autotune level 0 made the
      # step 5.5x slower; Triton GEMMs off saved 5 s of compile, now the step's own default, which XLA_FLAGS cannot undo)
      for flags in "" "--xla_gpu_autotune_level=0"; do
        echo "XLA_FLAGS=$flags" >> "$OUT/xlaflags.log"
        XLA_FLAGS="$flags" timeout 40 "${B[@]}" --steps 10 --warmup 2 --model-size tiny --moe pallas --attention cudnn \
          --accumulation fold 2>/dev/null | rows >> "$OUT/xlaflags.log"
      done
      cat "$OUT/xlaflags.log" ;;
    smallprofile)  # where small's step goes (35% MFU target): top kernels and the time per Python line, CUDA
      # graphs off; `gpu_kernels.py --model-size small --shape 32x1x512 --by-source 30` gives the same lines' floors
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 75 "${B[@]}" --steps 5 --warmup 2 --model-size small \
        --moe pallas --attention cudnn --profile /tmp/dsjax-profile-small > "$OUT/smallprofile.log" 2>&1
      grep -vE "^\{|^appended" "$OUT/smallprofile.log" | cut -c1-200 | tail -70 ;;
    headgrad)  # small's step with the head's backward GEMMs in bf16 (model.head_gradient_dtype: compute) against
      # the default fp32 gradient, which makes them TF32 GEMMs; the same machine, one after the other
      echo '{"model": {"head_gradient_dtype": "compute"}}' > /tmp/headgrad.json
      for config in "" "--config /tmp/headgrad.json"; do
        timeout 60 "${B[@]}" --model-size small --moe pallas --attention cudnn $config >> "$OUT/headgrad.log" 2>&1
      done
      rows < "$OUT/headgrad.log" ;;
    generate)  # batch-1 generation, 1,000 tokens, random weights: tiny (the 5,000 tokens/s target), then small
      timeout 60 python3 benchmarks/cpu_profile.py --generate --model-size tiny --new-tokens 1000 --runs 5 --top 0 \
        > "$OUT/generate.log" 2>&1
      tail -3 "$OUT/generate.log"
      timeout 60 python3 benchmarks/cpu_profile.py --generate --model-size small --new-tokens 1000 --runs 3 --top 0 \
        > "$OUT/generate_small.log" 2>&1
      tail -1 "$OUT/generate_small.log" ;;
    memory)
      timeout 55 "${B[@]}" --steps 3 --warmup 1 --model-size small --batch-size 64 --seq-len 1024 --moe pallas \
        --attention pallas > "$OUT/memory.log" 2>&1 ;;
    cli)
      rm -rf /tmp/cli && mkdir -p /tmp/cli
      start=$(date +%s.%N)
      timeout 55 python3 -m dsjax run --model-size tiny --config .gpu/vocab8k.json --max-steps 3000 \
        --data-dir .gpu/tinystories --work-dir /tmp/cli/data --checkpoint-dir /tmp/cli/ck --output-dir /tmp/cli/out \
        --log-interval 500 --eval-interval 1000 > "$OUT/cli.log" 2>&1
      echo "cli exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
      grep -E "step [0-9]+ \||done|error" "$OUT/cli.log" | cut -c1-160 | tail -8 ;;
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
