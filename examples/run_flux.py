"""FLUX.1 (FluxPipeline) with asynchronous denoising: the transformer is cut between its double-stream and
single-stream blocks.

    torchrun --nproc_per_node=2 examples/run_flux.py --model black-forest-labs/FLUX.1-dev --model_n 2 \\
        --warm_up 3 --prompt "a cat holding a sign that says hello world" --steps 28 --guidance_scale 3.5 \\
        --out flux.png
    torchrun --nproc_per_node=2 examples/run_flux.py --model black-forest-labs/FLUX.1-schnell --model_n 2 \\
        --warm_up 1 --steps 4 --guidance_scale 0 --max_sequence_length 256 --out schnell.png
    python examples/run_flux.py --model_n 2 --steps 8 --transport local            # tiny built-in FLUX.1-dev
    python examples/run_flux.py --schnell --model_n 2 --steps 4 --transport local  # tiny built-in FLUX.1-schnell

FLUX.1 is guidance-distilled: --guidance_scale feeds its guidance embedding (dev only), not classifier-free
guidance. --true_cfg_scale above 1 with a --negative_prompt runs real CFG (two transformer calls per step).
"""

import common


def inputs(args):
    return {"max_sequence_length": args.max_sequence_length, "true_cfg_scale": args.true_cfg_scale}


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--schnell", action="store_true", help="tiny model layout FLUX.1-schnell (without --model)")
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (default 512; tiny: 32)")
    p.add_argument("--true_cfg_scale", type=float, default=None, help=">1 with --negative_prompt: real CFG")
    args = p.parse_args()
    common.main("flux_schnell" if args.schnell else "flux", "FluxPipeline", args, inputs=inputs)
