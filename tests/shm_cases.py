"""Worker side of the shm set-up tests (tests/test_shm_setup.py): the tiny SD1.5-shaped pipeline of issue 12
(block_out_channels (32, 64, 64), CrossAttnDown x2 + Down, Up + CrossAttnUp x2, DDIM), several fresh AsyncDiff
instances in a row inside one 2-process launch, each with one pipeline call over the shm transport."""

from __future__ import annotations

import os
import time
import traceback

import torch

UNET_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
U1 = "up_blocks.1"
# issue 12's plan: the cut inside up_blocks.1
PLAN_CUT_UP = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0"]
    + [f"{U1}.resnets.0", f"{U1}.attentions.0", f"{U1}.resnets.1"],
    [f"{U1}.attentions.1", f"{U1}.resnets.2", f"{U1}.attentions.2", f"{U1}.upsamplers.0", "up_blocks.2"]
    + ["conv_norm_out", "conv_out"],
]
# messages that grow over the first steps: a warm-up chain (one hidden state down the chain), then rounds
PLAN_EARLY_CUT = [
    ["conv_in", "down_blocks.0"],
    ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]
CASES = {
    "cut_up": dict(plan=PLAN_CUT_UP, warm_up=1, steps=6),
    "cut_up_256": dict(plan=PLAN_CUT_UP, warm_up=1, steps=6, size=256),
    "warm_up_chain": dict(plan=PLAN_EARLY_CUT, warm_up=3, steps=6),
}


def build_pipeline():
    from diffusers import DDIMScheduler

    from asyncdiff_rt.tiny import make_pipeline
    from asyncdiff_rt.tiny.sd import sd15_unet

    pipe = make_pipeline("sd15", seed=0)
    pipe.unet = sd15_unet(
        0, block_out_channels=(32, 64, 64), down_block_types=UNET_DOWN, up_block_types=UNET_UP, norm_num_groups=8
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def run_repeats(
    rank: int, world: int, case_name: str, repeats: int, timeout_s: float = 10.0, lag_s: float = 0.3
) -> dict:
    """Per repeat: a fresh AsyncDiff on a fresh pipeline, one call; returns statuses, times and this rank's pid
    (rank 0's pid names every shm region of the launch). Rank 1 starts its call late by 0, lag_s/2 or lag_s
    (by turns): a receiver that runs behind its sender, as a freshly started process often does."""
    import asyncdiff_rt
    from asyncdiff_rt.tiny import call_kwargs

    case = CASES[case_name]
    out: dict = {"pid": os.getpid(), "runs": []}
    for i in range(repeats):
        pipe = build_pipeline()
        ad = None
        t0 = time.monotonic()
        try:
            ad = asyncdiff_rt.AsyncDiff(
                pipe,
                model_n=2,
                stride=1,
                warm_up=case["warm_up"],
                transport="shm",
                timeout_s=timeout_s,
                plan=case["plan"],
            )
            kwargs = call_kwargs("sd15", steps=case["steps"], seed=0)
            kwargs.update(height=case.get("size", 32), width=case.get("size", 32), output_type="latent")
            if rank == 1:  # rank 1 reaches its first receive late (at the first block of its segment)
                lag = [lag_s * (i % 3) / 2]
                first = dict(pipe.unet.named_modules())[case["plan"][1][0]]
                handle = first.register_forward_pre_hook(lambda *_, lag=lag: time.sleep(lag.pop()) if lag else None)
            image = pipe(**kwargs).images
            if rank == 1:
                handle.remove()
            status = ("ok", tuple(image.shape), float(image.double().abs().sum()))
        except Exception as err:  # noqa: BLE001 - the test inspects it
            status = ("error", type(err).__name__, f"{err}\n{traceback.format_exc()}")
        finally:
            if ad is not None:
                ad.remove()
        out["runs"].append((status, time.monotonic() - t0))
        torch.distributed.barrier()  # the next repeat starts together (a failed one may leave ranks apart)
    return out


GROWING_SIZES = (256, 40_000, 200_000, 600_000)  # float32 elements: every message needs a new generation


def run_transport_growth(rank: int, world: int, repeats: int, timeout_s: float = 10.0, lag_s: float = 0.05) -> dict:
    """Per repeat a fresh ShmTransport: rank 0 sends messages of growing sizes to rank 1 back to back (each one
    grows the channel), rank 1 starts receiving late by 0..lag_s; returns statuses, times and this rank's pid."""
    import torch.distributed as dist

    from asyncdiff_rt.transport.shm import ShmTransport

    dist.init_process_group("gloo")
    out: dict = {"pid": os.getpid(), "runs": []}
    for i in range(repeats):
        t0 = time.monotonic()
        transport = None
        try:
            transport = ShmTransport.from_group(timeout_s=timeout_s)
            for step, n in enumerate(GROWING_SIZES):
                if rank == 0:
                    transport.exchange(step, {1: [torch.arange(n, dtype=torch.float32) + step]}, {})
                else:
                    if step == 0:
                        time.sleep(lag_s * (i % 4) / 3)
                    buf = torch.empty(n)
                    transport.exchange(step, {}, {0: [buf]})
                    assert torch.equal(buf, torch.arange(n, dtype=torch.float32) + step), f"bad data at step {step}"
            transport.synchronize()
            transport.all_gather_object(None)  # both ranks got every message before either closes
            status = ("ok",)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            status = ("error", type(err).__name__, f"{err}\n{traceback.format_exc()}")
        finally:
            if transport is not None:
                transport.close()
        out["runs"].append((status, time.monotonic() - t0))
        dist.barrier()
    return out


def run_dead_at_set_up(rank: int, world: int, timeout_s: float) -> dict:
    """Rank 1 receives the first generation, then dies before it opens the second; rank 0 has grown its channel
    (generation 1) and waits in close for rank 1 to open it... which notices the dead pid."""
    import torch.distributed as dist

    from asyncdiff_rt.transport.shm import ShmTransport

    dist.init_process_group("gloo")
    transport = ShmTransport.from_group(timeout_s=timeout_s)
    if rank == 1:
        transport.exchange(0, {}, {0: [torch.empty(16)]})
        os._exit(3)
    out: dict = {"pid": os.getpid()}
    try:
        transport.exchange(0, {1: [torch.zeros(16)]}, {})
        transport.exchange(1, {1: [torch.zeros(100_000)]}, {})  # generation 1, never opened
        time.sleep(0.5)
        transport.exchange(2, {}, {1: [torch.empty(16)]})  # set-up of 1to0: rank 1 is dead
        out["error"] = None
    except Exception as err:  # noqa: BLE001 - the test inspects it
        out["error"] = (type(err).__name__, str(err))
    finally:
        transport.close()
    return out


def run_absent_peer(rank: int, world: int, transport: str, timeout_s: float) -> dict:
    """Issue 14: rank 1 builds AsyncDiff (the set-up agreement passes) and returns without calling the pipeline;
    rank 0 calls it and must raise TransportError naming peer rank 1 and the phase, within the timeout."""
    from asyncdiff_rt import AsyncDiff
    from asyncdiff_rt.tiny import call_kwargs, make_pipeline

    pipe = make_pipeline("sd15", seed=0)
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=1, transport=transport, timeout_s=timeout_s)
    out: dict = {"error": None, "elapsed": 0.0}
    if rank == 1:
        return out  # gone without a word (the launcher destroys its process group)
    kwargs = call_kwargs("sd15", steps=4, seed=0)
    kwargs["output_type"] = "latent"
    t0 = time.monotonic()
    try:
        pipe(**kwargs)
    except Exception as err:  # noqa: BLE001 - the test inspects it
        out["error"] = (type(err).__name__, str(err))
    out["elapsed"] = time.monotonic() - t0
    ad.remove()
    return out
