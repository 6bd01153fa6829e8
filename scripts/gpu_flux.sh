#!/usr/bin/env bash
# FLUX.1-dev on ONE GPU (issue 18), from the repository root: the measured plan table for n = 2..8, then the
# one-process latency bench at 1024 px, 28 steps, bf16: eager, graph floor, compile reduce-overhead, ours n=1,
# ours n=1 compile. Needs torch (2.11+cu130), diffusers importable (e.g. on PYTHONPATH) and asyncdiff_rt._C built
# (scripts/device_build.sh). Nothing is downloaded: random weights, random prompt embeddings, no text encoders.
#
#   bash scripts/gpu_flux.sh            # plan, then bench
#   bash scripts/gpu_flux.sh plan       # one step alone
#   bash scripts/gpu_flux.sh bench
#
# Expected on one H200, ~7-8.5 min in all (one device call allows 10; to be safe, `plan` and `bench` as two calls):
#   plan   ~1-1.5 min, peak ~26 GiB: the transformer made on the GPU in bf16 (22.2 GiB), each of its 57 blocks
#          timed once (CUDA-graph replay, 20 repeats), then n = 2..8 planned three ways from those costs.
#          -> $OUT/plan_flux_<device>.{json,md}   (e.g. plan_flux_nvidia-h200)
#   bench  ~5.5-7 min, peak ~26 GiB per variant (each variant's pipeline is freed before the next): a fresh
#          pipeline per variant (seconds), one warm call, 2 timed 28-step calls (~4.7 s each at ~0.17 s a step):
#          ~25 s per plain variant; compile_ro and ours_n1_compile spend ~1-2.5 min each compiling (SD3 took
#          ~1 min on an H100; FLUX's graph is ~2.4x larger, the second compile reuses Inductor's kernel cache).
#          -> $OUT/latency_flux_<device>.{json,md,png}
# Resumable: run it again after a cut-short call and it skips the plan table when its JSON exists (FORCE=1 redoes
# it) and every bench variant already measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
what=${1:-all}
total=$SECONDS

step() {  # name, command...: run it and print how long it took
  local name=$1 t0=$SECONDS
  shift
  echo "=== $name: $*"
  "$@"
  echo "=== $name: $((SECONDS - t0)) s (total $((SECONDS - total)) s)"
}

"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name(0), f'{torch.cuda.mem_get_info()[0] / 2**30:.0f} GiB free')"

if [[ $what == all || $what == plan ]]; then
  slug=$("$PY" -c "import re, torch; print(re.sub('[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())")
  if [[ -f $OUT/plan_flux_$slug.json && -z ${FORCE:-} ]]; then
    echo "=== plan: $OUT/plan_flux_$slug.json exists, skipped (FORCE=1 redoes it)"
  else
    step plan "$PY" benchmarks/flux_plans.py --model flux --cost measured --out "$OUT"
  fi
fi
if [[ $what == all || $what == bench ]]; then
  step bench "$PY" -m asyncdiff_rt bench --model flux --steps 28 --runs 2 --out "$OUT" \
    --variants eager,graph_floor,compile_ro,ours_n1,ours_n1_compile
fi
echo "=== gpu_flux.sh: done in $((SECONDS - total)) s"
