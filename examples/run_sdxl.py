"""Stable Diffusion XL (StableDiffusionXLPipeline) with asynchronous denoising.

    torchrun --nproc_per_node=3 examples/run_sdxl.py --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --model_n 3 --stride 1 --warm_up 9 --prompt "a photo of an astronaut riding a horse on mars" \\
        --steps 50 --seed 0 --out sdxl.png
    python examples/run_sdxl.py --model_n 2 --steps 10 --transport local          # tiny built-in SDXL
"""

import common

if __name__ == "__main__":
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.main("sdxl", "StableDiffusionXLPipeline", args)
