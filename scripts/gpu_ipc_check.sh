#!/usr/bin/env bash
# The ipc transport on a GPU machine, in one call (under 3 minutes on one H200): build asyncdiff_rt._C (CUDA), run
# tests/cuda/test_ipc_cuda.py and a shm regression subset (two pytest processes side by side), then a small
# exchange benchmark (ipc against shm, SDXL sizes). Prints one PASS/FAIL line per test and per check, then a
# summary; exits non-zero on any FAIL. Run from anywhere; PYTHON=... picks the interpreter (default python3).
#
#   bash scripts/gpu_ipc_check.sh            # OUT=<dir> keeps the logs and the benchmark tables (default /tmp)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/adrt_ipc_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
fails=0
start=$(date +%s)
say() { echo "$1 $2"; [ "$1" = FAIL ] && fails=$((fails + 1)); return 0; }

# 1. build (the .so is not in git; the GPU machine's Python differs from CI's)
if PYTHON="$PY" bash scripts/device_build.sh --cmake >"$OUT/build.log" 2>&1; then
  say PASS "build: asyncdiff_rt._C with CUDA ($(( $(date +%s) - start )) s)"
else
  say FAIL "build: see $OUT/build.log"; tail -30 "$OUT/build.log"
  echo "SUMMARY: build failed"; exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

# 2. tests, two pytest processes side by side (-p no:cacheprovider: nothing written into the tree): the ipc file
# (AsyncDiff with 2 processes moved to the second group) and a regression subset of the shm tests (shared code)
run_pytest() {  # name, timeout, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest -p no:cacheprovider -q -rA --tb=short -m cuda "$@" >"$OUT/$name.log" 2>&1
  echo $? >"$OUT/$name.rc"
}
sim2="tests/cuda/test_ipc_cuda.py::test_processes_on_one_gpu_over_ipc_equal_simulator[2]"
run_pytest ipc_a 160 tests/cuda/test_ipc_cuda.py --deselect "$sim2" &
a=$!
run_pytest ipc_b 160 "$sim2" "tests/cuda/test_shm_cuda.py::test_shm_channel_gpu_two_processes" \
  "tests/cuda/test_shm_cuda.py::test_shm_transport_cuda" &
b=$!
wait $a $b
for name in ipc_a ipc_b; do
  log="$OUT/$name.log"
  grep -E "^(PASSED|FAILED|ERROR) " "$log" | while read -r status id rest; do
    case $status in PASSED) echo "PASS $id" ;; *) echo "FAIL $id $rest" ;; esac
  done
  n_fail=$(grep -cE "^(FAILED|ERROR) " "$log")
  rc=$(cat "$OUT/$name.rc")
  if [ "$rc" = 124 ]; then say FAIL "$name: pytest ran past its time limit (see $log)"; fi
  if [ "$n_fail" -gt 0 ] || { [ "$rc" != 0 ] && [ "$rc" != 124 ]; }; then
    fails=$((fails + 1))
    echo "---- $name: failures (full log $log)"
    sed -n '/= FAILURES =/,/short test summary/p' "$log" | tail -80
    grep -E "^(E  |ERROR)" "$log" | head -20
  fi
  tail -1 "$log"
done

# 3. a small exchange benchmark: ipc must beat shm on the largest SDXL message
if timeout 75 "$PY" benchmarks/exchange.py --models sdxl_1024 --kinds ipc,shm --iters 10 --out "$OUT" \
  >"$OUT/bench.log" 2>&1; then
  cat "$OUT"/exchange_*.md
  verdict=$("$PY" - "$OUT" <<'PYEOF'
import glob, json, sys
rows = json.load(open(sorted(glob.glob(f"{sys.argv[1]}/exchange_*.json"))[-1]))["rows"]
big = max(rows, key=lambda r: r["mbytes"])
ok = big["ipc_ms"] < big["shm_ms"]
print(("PASS" if ok else "FAIL") + f" bench: ipc {big['ipc_ms']:.3f} ms vs shm {big['shm_ms']:.3f} ms one-way for "
      f"{big['mbytes']:.1f} MB ({big['mbytes'] / big['ipc_ms']:.1f} vs {big['mbytes'] / big['shm_ms']:.1f} GB/s)")
PYEOF
)
  [ -n "$verdict" ] || verdict="FAIL bench: could not read the benchmark's results"
  say "${verdict%% *}" "${verdict#* }"
else
  say FAIL "bench: benchmarks/exchange.py failed (see $OUT/bench.log)"; tail -30 "$OUT/bench.log"
fi

echo "SUMMARY: $([ $fails = 0 ] && echo "all PASS" || echo "$fails FAIL group(s)") in $(( $(date +%s) - start )) s; logs in $OUT"
[ $fails = 0 ]
