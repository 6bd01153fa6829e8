#!/usr/bin/env bash
# CI (no GPU): compile and link the CUDA variant of the native runtime into its own build dir, run the native
# tests that run on a CPU, and import the CUDA-built module (it must import without a driver or GPU, and
# check_runtime must say so clearly).
#
#   scripts/ci_cuda_build.sh [build-dir]      (default build/cuda; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
build=${1:-build/cuda}
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DASYNCDIFF_RT_WITH_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v "$PY")"
cmake --build "$build" --parallel
echo "CUDA build took $(( $(date +%s) - start )) s"
ctest --test-dir "$build" --output-on-failure
so=$(ls "$build"/asyncdiff_rt/_C*.so)
"$PY" - "$so" <<'PYEOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("asyncdiff_rt._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
info = C.build_info()
print(info)
assert info["with_cuda"] and info["with_nccl"], info
try:
    C.check_runtime()
    print("check_runtime: ok (a GPU is usable)")
except RuntimeError as err:
    msg = str(err)
    assert "asyncdiff_rt" in msg and ("no CUDA" in msg or "driver" in msg), msg
    print(f"check_runtime raised as expected without a GPU: {msg}")
    # GPU-only calls fail with the reason instead of crashing.
    try:
        C.ShmChannel("adrt_ci_probe", 4096, True, 0, 1, 1.0)
    except RuntimeError as e:
        print(f"ShmChannel(device=0) raised: {e}")
    else:
        raise SystemExit("ShmChannel on device 0 did not raise without a GPU")
    try:
        C.IpcChannel("adrt_ci_probe_ipc", 4096, True, 0, 1, 1.0)
    except RuntimeError as e:
        print(f"IpcChannel(device=0) raised: {e}")
    else:
        raise SystemExit("IpcChannel on device 0 did not raise without a GPU")
print("ci_cuda_build: ok")
PYEOF
