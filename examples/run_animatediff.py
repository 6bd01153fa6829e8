"""AnimateDiff (AnimateDiffPipeline, text to video) with asynchronous denoising: the UNetMotionModel (UNet +
motion modules) is cut into segments.

    torchrun --nproc_per_node=2 examples/run_animatediff.py --model emilianJR/epiCRealism \\
        --motion_adapter guoyww/animatediff-motion-adapter-v1-5-2 --prompt "a panda surfing, golden hour" \\
        --num_frames 16 --model_n 2 --warm_up 3 --steps 25 --out animatediff.gif
    python examples/run_animatediff.py --model_n 2 --steps 8 --transport local    # tiny model, 3 frames

--model is a Stable Diffusion 1.5 folder or id; --motion_adapter the MotionAdapter. Rank 0 saves a GIF (or one
PNG per frame with --out frames.png).
"""

import common


def components(args, dtype):
    if args.motion_adapter is None:
        raise SystemExit("with --model, pass --motion_adapter (a MotionAdapter folder or id)")
    from diffusers import MotionAdapter

    return {"motion_adapter": MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype)}


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0], video=True)
    p.add_argument("--motion_adapter", default=None, help="MotionAdapter folder or id (with --model)")
    common.main("animatediff", "AnimateDiffPipeline", p.parse_args(), components=components)
