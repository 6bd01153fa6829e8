"""ControlNet + SDXL (StableDiffusionXLControlNetPipeline) with asynchronous denoising.

    torchrun --nproc_per_node=2 examples/run_sdxl_controlnet.py --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --controlnet diffusers/controlnet-canny-sdxl-1.0 --control canny.png --prompt "aerial view, a city" \\
        --controlnet_conditioning_scale 0.5 --model_n 2 --warm_up 5 --steps 30 --out controlnet.png
    python examples/run_sdxl_controlnet.py --model_n 2 --steps 8 --transport local   # tiny model, edges made in code

--controlnet_mode: "auto" (default) lists the ControlNet's blocks in the partition with the UNet's, so no rank runs
the whole ControlNet each step (measured cheaper at SDXL-1024: benchmarks/README.md); "replicated" runs it on every
rank, its residuals then fresh inputs of each rank's UNet segment.
"""

import common


def components(args, dtype):
    if args.controlnet is None:
        raise SystemExit("with --model, pass --controlnet (a ControlNetModel folder or id)")
    from diffusers import ControlNetModel

    return {"controlnet": ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)}


def inputs(args):
    common.require(args, "control")
    return {
        "image": common.load_image(args.control),
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
    }


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--controlnet", default=None, help="ControlNetModel folder or id (with --model)")
    p.add_argument("--control", default=None, help="the control (condition) image, e.g. canny edges")
    p.add_argument("--controlnet_conditioning_scale", type=float, default=None)
    p.add_argument("--controlnet_mode", default="auto", choices=("auto", "blocks", "replicated"))
    common.main(
        "sdxl_controlnet", "StableDiffusionXLControlNetPipeline", p.parse_args(), inputs=inputs, components=components
    )
