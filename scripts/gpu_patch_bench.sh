#!/usr/bin/env bash
# PatchParallel's emulated tables (issue 17 item 6), one invocation per table, on ONE GPU under CUDA MPS.
# Run from the repo root on the GPU machine: torch 2.11+cu130, diffusers on PYTHONPATH, asyncdiff_rt._C built
# (scripts/device_build.sh), nvidia-cuda-mps-control on the PATH. Each invocation writes
# benchmarks/results/emulated_patch_sdxl_<size>_<device>.{json,md} after every variant (a rerun with the same
# settings keeps what was measured). Pass a table name (2048_p2, 2048_p4, 1024_p2) to run only that one.
# Estimates (H200; a 2048 px SDXL step ~0.4 s on the whole GPU, ~15 s to start and build each variant's processes):
set -euo pipefail
PY=${PYTHON:-python3}
run() {  # name, then the bench arguments
  local name=$1 t0=$SECONDS
  shift
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  echo "=== $name: $PY -m asyncdiff_rt bench $*"
  "$PY" -m asyncdiff_rt bench "$@"
  echo "=== $name: $((SECONDS - t0)) s"
}
ONLY=${1:-}
# ~5 min: one (~40 s), control (~45 s), 7 sync modes (~30 s each); 20 steps, 1 timed run
run 2048_p2 --model sdxl --emulate 2 --strategy patch --size 2048 --steps 20 --runs 1 --emulate_timeout 400
# ~6 min: one and control at 25 % (~75 s each), 7 modes (~30 s each); 12 steps, 2 timed runs
run 2048_p4 --model sdxl --emulate 4 --strategy patch --size 2048 --steps 12 --runs 2 --emulate_timeout 400
# ~3 min: 1024 px steps are ~4x cheaper; --compare adds segments n=2 at W=1 and 3 and cfg2 (the choice table)
run 1024_p2 --model sdxl --emulate 2 --strategy patch --size 1024 --steps 20 --runs 2 --compare
