#!/usr/bin/env bash
# Build asyncdiff_rt._C in place on the GPU machine (CUDA variant) and print its build info.
#
#   scripts/device_build.sh            # pip install --no-build-isolation --no-deps -e .  (default)
#   scripts/device_build.sh --cmake    # direct CMake build into build/device, .so copied into asyncdiff_rt/
#   scripts/device_build.sh --ctest    # the CMake build plus the native tests (ctest)
#
# Needs: python3 with torch (+cu13x), pybind11, cmake, ninja, nvidia-nccl-cu13; nvcc 13 on PATH or in
# /usr/local/cuda. PYTHON=... picks the interpreter. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-pip}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export ASYNCDIFF_RT_WITH_CUDA=${ASYNCDIFF_RT_WITH_CUDA:-ON}
start=$(date +%s)
case "$mode" in
  pip|--pip)
    "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
  --cmake|--ctest)
    build=${BUILD_DIR:-build/device}
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DASYNCDIFF_RT_WITH_CUDA="$ASYNCDIFF_RT_WITH_CUDA" \
      -DPython_EXECUTABLE="$(command -v "$PY")" \
      -DASYNCDIFF_RT_BUILD_TESTS="$([ "$mode" = --ctest ] && echo ON || echo OFF)"
    cmake --build "$build" --parallel
    cp -f "$build"/asyncdiff_rt/_C*.so asyncdiff_rt/
    if [ "$mode" = --ctest ]; then ctest --test-dir "$build" --output-on-failure; fi ;;
  *)
    echo "usage: $0 [--pip|--cmake|--ctest]" >&2; exit 2 ;;
esac
echo "build took $(( $(date +%s) - start )) s"
"$PY" - <<'PYEOF'
import json, sys
sys.path.insert(0, ".")
from asyncdiff_rt import native
info = native.build_info()
print(json.dumps(info, indent=1))
if not info.get("available"):
    sys.exit("asyncdiff_rt._C did not import")
try:
    native.load().check_runtime()
    print("check_runtime: ok")
except RuntimeError as err:
    print(f"check_runtime: {err}")
PYEOF
