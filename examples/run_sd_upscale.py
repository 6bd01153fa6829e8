"""Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline) with asynchronous denoising.

    torchrun --nproc_per_node=2 examples/run_sd_upscale.py --model stabilityai/stable-diffusion-x4-upscaler \\
        --image low_res.png --prompt "a white cat" --model_n 2 --warm_up 5 --steps 50 --out upscaled.png
    python examples/run_sd_upscale.py --model_n 2 --steps 8 --transport local     # tiny model, 16x16 -> 64x64

The output is 4x the low-resolution input in each direction (--height/--width do not apply).
"""

import common


def inputs(args):
    common.require(args, "image")
    return {"image": common.load_image(args.image), "noise_level": args.noise_level}


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--image", default=None, help="the low-resolution image")
    p.add_argument("--noise_level", type=int, default=None, help="noise added to the low-res image (default 20)")
    common.main("sd_upscale", "StableDiffusionUpscalePipeline", p.parse_args(), inputs=inputs)
