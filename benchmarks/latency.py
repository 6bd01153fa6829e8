"""The 50-step loop latency on the real architectures: see asyncdiff_rt/bench.py (also `asyncdiff-rt bench`).

python benchmarks/latency.py --model sdxl --out benchmarks/results
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncdiff_rt.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
