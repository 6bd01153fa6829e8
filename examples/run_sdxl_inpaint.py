"""SDXL inpainting (StableDiffusionXLInpaintPipeline) with asynchronous denoising.

    torchrun --nproc_per_node=2 examples/run_sdxl_inpaint.py \\
        --model diffusers/stable-diffusion-xl-1.0-inpainting-0.1 --image photo.png --mask mask.png \\
        --prompt "a tiger sitting on a park bench" --strength 0.99 --model_n 2 --warm_up 5 --steps 30 --out inpaint.png
    python examples/run_sdxl_inpaint.py --model_n 2 --steps 8 --transport local   # tiny model, image+mask made in code

The mask is white where the image is repainted. With strength < 1 the loop runs int(steps * strength) steps,
from scheduler.begin_index; warm_up counts those steps.
"""

import common


def inputs(args):
    common.require(args, "image", "mask")
    mask = common.load_image(args.mask)
    return {
        "image": common.load_image(args.image),
        "mask_image": mask.convert("L") if mask is not None else None,
        "strength": args.strength,
    }


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--image", default=None, help="the image to inpaint")
    p.add_argument("--mask", default=None, help="mask image: white = repaint")
    p.add_argument("--strength", type=float, default=None, help="default: 0.9999 (tiny model: 0.75)")
    common.main("sdxl_inpaint", "StableDiffusionXLInpaintPipeline", p.parse_args(), inputs=inputs)
