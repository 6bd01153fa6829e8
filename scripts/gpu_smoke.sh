#!/usr/bin/env bash
# One device call: install the carried diffusers wheel, build the CUDA extension in place, run the cuda tests,
# then whatever benchmark commands are passed as arguments. Usage: bash scripts/gpu_smoke.sh "cmd1" "cmd2" ...
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))"
for cmd in "$@"; do echo "=== $cmd"; eval "$cmd"; done
