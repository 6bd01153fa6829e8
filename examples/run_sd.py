"""Stable Diffusion 1.5 / 2.1 (StableDiffusionPipeline) with asynchronous denoising.

    torchrun --nproc_per_node=2 examples/run_sd.py --model runwayml/stable-diffusion-v1-5 --model_n 2 \\
        --stride 1 --warm_up 3 --prompt "a photo of an astronaut riding a horse on mars" --steps 50 --out sd.png
    python examples/run_sd.py --version 2.1 --model_n 2 --steps 10 --transport local   # tiny built-in SD 2.1

Without --model it runs a tiny random-weight pipeline of the same class (--version picks the SD 1.5 or 2.1
layout); see examples/README.md for how it launches.
"""

import common

if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--version", default="1.5", choices=("1.5", "2.1"), help="tiny model layout (without --model)")
    args = p.parse_args()
    common.main({"1.5": "sd15", "2.1": "sd21"}[args.version], "StableDiffusionPipeline", args)
