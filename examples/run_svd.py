"""Stable Video Diffusion (StableVideoDiffusionPipeline, image to video) with asynchronous denoising.

    torchrun --nproc_per_node=2 examples/run_svd.py --model stabilityai/stable-video-diffusion-img2vid-xt \\
        --image rocket.png --height 576 --width 1024 --model_n 2 --warm_up 3 --steps 25 --decode_chunk_size 8 \\
        --out svd.gif
    python examples/run_svd.py --model_n 2 --steps 8 --transport local            # tiny model, 64x64, 3 frames

Rank 0 saves the frames as an animated GIF (--out ending in .gif) or one PNG per frame (--out frames.png).
Guidance: --min_guidance_scale / --max_guidance_scale (this pipeline has no prompt and no --guidance_scale).
"""

import common


def inputs(args):
    common.require(args, "image")
    return {
        "image": common.load_image(args.image),
        "fps": args.fps,
        "motion_bucket_id": args.motion_bucket_id,
        "noise_aug_strength": args.noise_aug_strength,
        "decode_chunk_size": args.decode_chunk_size,
        "min_guidance_scale": args.min_guidance_scale,
        "max_guidance_scale": args.max_guidance_scale,
    }


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0], video=True)
    p.add_argument("--image", default=None, help="the conditioning image")
    p.add_argument("--motion_bucket_id", type=int, default=None)
    p.add_argument("--noise_aug_strength", type=float, default=None)
    p.add_argument("--decode_chunk_size", type=int, default=None)
    p.add_argument("--min_guidance_scale", type=float, default=None)
    p.add_argument("--max_guidance_scale", type=float, default=None)
    common.main("svd", "StableVideoDiffusionPipeline", p.parse_args(), inputs=inputs)
