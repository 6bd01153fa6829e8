"""Stable Diffusion 3 (StableDiffusion3Pipeline) with asynchronous denoising: the MMDiT is cut between its
transformer_blocks.

    torchrun --nproc_per_node=2 examples/run_sd3.py --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --model_n 2 --warm_up 5 --prompt "a cat holding a sign that says hello world" --steps 28 --out sd3.png
    python examples/run_sd3.py --model_n 2 --steps 8 --transport local            # tiny built-in SD3
"""

import common


def inputs(args):
    return {"max_sequence_length": args.max_sequence_length}


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (default 256; tiny: 32)")
    common.main("sd3", "StableDiffusion3Pipeline", p.parse_args(), inputs=inputs)
