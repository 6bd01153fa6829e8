#!/usr/bin/env bash
# The whole cuda tier on one GPU in one device call (~6 min on one H200): build asyncdiff_rt._C (CUDA, ctest),
# then three pytest groups side by side (patches; the ipc/shm channels; runtime, CFG and FLUX), then the two MPS
# tests one after the other (each starts its own MPS daemon: nothing else may run beside it). Every group has its
# own time limit and log; junit XML keeps each test's outcome even when a group is cut. Exits non-zero on any
# failure. Run from the repository root; OUT=<dir> keeps the logs (default /tmp/adrt_cuda_tier); PACK=1 leaves
# them as one logs.tar.gz there (the device tool brings back only a few files).
#
#   bash scripts/gpu_cuda_tier.sh            # GROUP_S=300 MPS_S=200: the limits in seconds (the MPS segments
#                                            # test alone takes ~120 s on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/adrt_cuda_tier}
GROUP_S=${GROUP_S:-300}
MPS_S=${MPS_S:-200}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
if ! PYTHON="$PY" bash scripts/device_build.sh --ctest >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "SUMMARY: build failed"; exit 1
fi
echo "build and ctest: $(grep -E 'tests passed|tests failed' "$OUT/build.log") ($((SECONDS - start)) s)"

group() {  # name, limit, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest -p no:cacheprovider -q -rA --tb=short --timeout "$limit" \
    --junitxml "$OUT/$name.xml" "$@" >"$OUT/$name.log" 2>&1
  echo $? >"$OUT/$name.rc"
}
group patch "$GROUP_S" tests/cuda/test_patch_cuda.py &
group channels "$GROUP_S" tests/cuda/test_ipc_cuda.py tests/cuda/test_shm_cuda.py &
group runtime "$GROUP_S" tests/cuda/test_runtime_cuda.py tests/cuda/test_cfg_cuda.py tests/cuda/test_bench_flux_cuda.py &
wait
echo "side-by-side groups: $((SECONDS - start)) s"
group mps_segments "$MPS_S" tests/cuda/test_bench_emulate.py
group mps_patches "$MPS_S" tests/cuda/test_bench_emulate_patch.py

fails=0
for name in patch channels runtime mps_segments mps_patches; do
  rc=$(cat "$OUT/$name.rc")
  echo "== $name (rc $rc): $(tail -1 "$OUT/$name.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/$name.log" | head -20
  if [ "$rc" != 0 ]; then
    fails=$((fails + 1))
    sed -n '/= FAILURES =/,/short test summary/p' "$OUT/$name.log" | grep -E "^(E  |_____|.*Error)" | head -40
    [ "$rc" = 124 ] && echo "   cut by its ${GROUP_S}/${MPS_S} s limit"
  fi
done
echo "SUMMARY: $([ $fails = 0 ] && echo "all groups passed" || echo "$fails group(s) failed") in $((SECONDS - start)) s"
if [ "${PACK:-0}" = 1 ]; then
  (cd "$OUT" && tar czf logs.tar.gz --exclude logs.tar.gz . && find . -type f ! -name logs.tar.gz -delete)
fi
[ $fails = 0 ]
