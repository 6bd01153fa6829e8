#!/usr/bin/env bash
# FLUX.1-dev on 2 and 4 GPUs emulated on ONE GPU under CUDA MPS (issue 18; benchmarks/README.md "emulated"),
# from the repository root: 1024 px, 28 steps, bf16, each N: one, control, ours_n{N}s1w1, ours_n{N}s1w3 (and
# ours_n3s2w1 at N = 4); the CFG-parallel variants are skipped with a note (FLUX.1-dev is guidance-distilled).
# Same needs as scripts/gpu_flux.sh, plus nvidia-cuda-mps-control on the PATH (the bench starts and stops its own
# daemon) and no device setting changed.
#
#   bash scripts/gpu_flux_emulate.sh 2      # one device call each: N = 2 ...
#   bash scripts/gpu_flux_emulate.sh 4      # ... then N = 4 (both merge into one results file)
#   bash scripts/gpu_flux_emulate.sh        # 2 then 4 in one call: ~10-11 min, over one call's 10 min
#
# Expected on one H200, with 2 timed calls per variant after one warm-up call, each variant in fresh processes:
#   N = 2  ~4 min  (a call ~9 s at 50 % of the SMs; segments ~5 s). Memory: up to 2 full pipelines, ~52 GiB.
#   N = 4  ~7 min  (a call ~19 s at 25 %; segments ~6 s). Memory: the control holds 4 full pipelines side by
#          side, ~4 x 26 = 104 GiB of the 139; each segments rank builds the whole transformer (22.2 GiB, made in
#          bf16: never a float32 copy) before AsyncDiff frees the blocks it does not own, so set-up peaks at
#          ~4 x 22.4 = 90 GiB plus rank 0's block timing (~3 GiB), then ~6-8 GiB per rank.
# -> $OUT/emulated_flux_<device>.{json,md}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
total=$SECONDS
ns=("$@")
[[ ${#ns[@]} -gt 0 ]] || ns=(2 4)
for n in "${ns[@]}"; do
  t0=$SECONDS
  echo "=== emulate $n: bench --model flux --emulate $n --steps 28 --runs 2"
  "$PY" -m asyncdiff_rt bench --model flux --emulate "$n" --steps 28 --runs 2 --emulate_timeout 420 --out "$OUT"
  echo "=== emulate $n: $((SECONDS - t0)) s (total $((SECONDS - total)) s)"
done
