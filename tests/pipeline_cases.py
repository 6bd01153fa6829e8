"""Both sides of the pipeline tests (tests/test_pipelines.py): explicit plans per tiny kind, the call of each case,
and the worker that runs a list of cases on every rank over gloo.

A case attaches one AsyncDiff and calls the pipeline once per entry of "calls":
    kind       tiny pipeline kind (asyncdiff_rt.tiny.KINDS)
    plan       explicit plan (list of segments of module names), or a key of PLANS[kind] (default "default")
    controlnet as AsyncDiff and simulate ("auto": ControlNet blocks listed; "replicated")
    stride, warm_up, time_shift, stride_eps, drop_weights: as AsyncDiff (and simulate)
    steps      num_inference_steps (default 4)
    calls      list of call variants (default [{}]); a variant may set
                   call      overrides of tiny.call_kwargs (prompt=[...], num_images_per_prompt=2, guidance_scale=...)
                   callback  "record" (record (step index, timestep)) or "edit" (also scale the latents at step 1:
                             the callback changes the run, on every rank alike); "old": record through the
                             deprecated callback(i, t, latents) + callback_steps=1 (the x4 upscaler's only kind)
                   steps, warm_up  for this call (warm_up through ad.reset_state(warm_up=...), the reference's API)
    scheduler_before  a diffusers scheduler class name set before AsyncDiff is constructed
    swap_scheduler    one set after AsyncDiff is attached (before the first call)
Every rank returns, per case, ("ok", [(output, callback records) per call]) — outputs only on rank 0 — or
("error", type name, message), so a test can check that every rank raised and none was left waiting.
`variant(case, i)` merges a case with its i-th call variant: what `simulated` and `exact` take.
"""

from __future__ import annotations

import contextlib

import torch

# ---- explicit plans: the last segment owns the output block (conv_out / proj_out) -------------------------------

_UNET4_S0 = ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block"]
_UNET4_S1 = ["up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_out"]
_UNET4 = [_UNET4_S0, _UNET4_S1]
# a cut inside the down path and an up block split into its parts
_UNET4_FINE = [
    ["conv_in", "down_blocks.0", "down_blocks.1"],
    [
        "down_blocks.2",
        "down_blocks.3",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
        "up_blocks.1.resnets.2",
        "up_blocks.1.attentions.2",
        "up_blocks.1.upsamplers.0",
        "up_blocks.2",
        "up_blocks.3",
        "conv_norm_out",
        "conv_out",
    ],
]

_SDXL = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
    ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]
# up_blocks.0.attentions.0 and up_blocks.0.resnets.1 in different segments: a cut inside an up block
_SDXL_INSIDE_UP = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0.resnets.0",
     "up_blocks.0.attentions.0"],
    ["up_blocks.0.resnets.1", "up_blocks.0.attentions.1", "up_blocks.0.resnets.2", "up_blocks.0.attentions.2",
     "up_blocks.0.upsamplers.0", "up_blocks.1", "up_blocks.2", "conv_out"],
]  # fmt: skip
# the high-resolution head and tail together (the reference's SDXL split), in the last segment (it owns conv_out)
_SDXL_HEAD_TAIL = [
    ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"],
    ["conv_in", "down_blocks.0", "up_blocks.2", "conv_out"],
]
# cuts inside Transformer2DModels: transformer_blocks of the deepest attentions and the mid block
_SDXL_INSIDE_ATTN = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2.resnets.0", "down_blocks.2.attentions.0.proj_in",
     "down_blocks.2.attentions.0.transformer_blocks.0", "down_blocks.2.attentions.0.transformer_blocks.1",
     "mid_block.attentions.0.transformer_blocks.0"],
    ["down_blocks.2.attentions.0.transformer_blocks.2", "down_blocks.2.resnets.1", "down_blocks.2.attentions.1",
     "mid_block.resnets.0", "mid_block.attentions.0.transformer_blocks.1", "mid_block.resnets.1", "up_blocks.0",
     "up_blocks.1", "up_blocks.2", "conv_out"],
]  # fmt: skip

# ControlNet listed as blocks (controlnet="blocks", the default): the ControlNet's encoder in segment 0, its mid
# block and zero convs in segment 1, so residuals cross segments and follow the stale rule
_CN = [
    "controlnet." + b
    for b in ("conv_in", "controlnet_cond_embedding", "down_blocks.0", "down_blocks.1", "down_blocks.2")
]
_CN_TAIL = [
    "controlnet." + b for b in ("mid_block", *(f"controlnet_down_blocks.{i}" for i in range(9)), "controlnet_mid_block")
]
_SDXL_CN_BLOCKS = [
    _CN + ["unet." + b for b in ("conv_in", "down_blocks.0", "down_blocks.1")],
    _CN_TAIL + ["unet." + b for b in ("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2",
                                      "conv_out")],
]  # fmt: skip

_SD3 = [["transformer_blocks.0", "transformer_blocks.1"], ["transformer_blocks.2", "transformer_blocks.3", "proj_out"]]
_SD3_UNEVEN = [
    ["pos_embed", "context_embedder", "transformer_blocks.0"],
    ["transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.3", "norm_out", "proj_out"],
]

# FLUX.1: a cut between the double-stream blocks and inside the single-stream ones
_FLUX = [
    ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"],
    ["single_transformer_blocks.1", "single_transformer_blocks.2", "single_transformer_blocks.3", "proj_out"],
]
_SD35_LARGE = [
    ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    ["transformer_blocks.3", "transformer_blocks.4", "transformer_blocks.5", "proj_out"],
]

_UPSCALE = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2"],
    ["down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_out"],
]
_ANIMATEDIFF = [
    ["conv_in", "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block.resnets.0"],
    ["mid_block.attentions.0", "mid_block.motion_modules.0", "mid_block.resnets.1", "up_blocks.0", "up_blocks.1",
     "up_blocks.2", "up_blocks.3", "conv_out"],
]  # fmt: skip

PLANS: dict[str, dict[str, list[list[str]]]] = {
    "sd15": {"default": _UNET4, "fine": _UNET4_FINE},
    "sd21": {"default": _UNET4_FINE},
    "sdxl": {"default": _SDXL, "inside_up": _SDXL_INSIDE_UP, "head_tail": _SDXL_HEAD_TAIL,
             "inside_attn": _SDXL_INSIDE_ATTN},
    "sdxl_inpaint": {"default": _SDXL_INSIDE_UP},
    "sdxl_controlnet": {"default": _SDXL_CN_BLOCKS, "replicated": _SDXL, "head_tail": _SDXL_HEAD_TAIL},
    "sd_upscale": {"default": _UPSCALE},
    "sd3": {"default": _SD3, "uneven": _SD3_UNEVEN},
    "sd35_medium": {"default": _SD3},
    "sd35_large": {"default": _SD35_LARGE},
    "flux": {"default": _FLUX},
    "flux_schnell": {"default": _FLUX},
    "svd": {"default": _UNET4},
    "animatediff": {"default": _ANIMATEDIFF},
}  # fmt: skip

# guidance off, as each pipeline spells it (CFG is on when the scale is > 1)
CFG_OFF = {
    "svd": {"min_guidance_scale": 1.0, "max_guidance_scale": 1.0},
}


def cfg_off(kind: str) -> dict:
    return dict(CFG_OFF.get(kind, {"guidance_scale": 1.0}))


def plan_of(case: dict) -> list[list[str]]:
    plan = case.get("plan", "default")
    return PLANS[case["kind"]][plan] if isinstance(plan, str) else plan


def case_id(case: dict) -> str:
    parts = [case["kind"], f"s{case.get('stride', 1)}", f"w{case.get('warm_up', 1)}"]
    if isinstance(case.get("plan"), str):
        parts.append(case["plan"])
    for key in ("time_shift", "stride_eps", "drop_weights", "scheduler_before", "swap_scheduler", "controlnet"):
        if key in case:
            parts.append(f"{key}={case[key]}")
    return "-".join(str(p) for p in parts)


def variant_id(v: dict) -> str:
    parts = [f"{key}={v[key]}" for key in ("steps", "warm_up", "callback") if key in v]
    for key, value in v.get("call", {}).items():
        parts.append(f"{key}={value if not isinstance(value, list) else len(value)}")
    return ",".join(parts) or "default"


def variant(case: dict, i: int) -> dict:
    v = case.get("calls", [{}])[i]
    return {**case, **v, "call": {**case.get("call", {}), **v.get("call", {})}}


# ---- one call --------------------------------------------------------------------------------------------------

_PIPES: dict = {}
_SCHEDULERS: dict = {}


def fresh(kind: str):
    """A new tiny pipeline of `kind` (same seed: identical weights on every rank). The workers build one per case:
    with one process per rank, AsyncDiff frees the weights of the blocks other ranks own."""
    from asyncdiff_rt.tiny import make_pipeline

    return make_pipeline(kind, seed=0)


def build(kind: str):
    """The reference side's tiny pipeline of `kind`, built once per process (never given to a multi-process
    AsyncDiff), with its own scheduler back if an earlier test swapped it."""
    if kind not in _PIPES:
        _PIPES[kind] = fresh(kind)
        _SCHEDULERS[kind] = _PIPES[kind].scheduler
    pipe = _PIPES[kind]
    pipe.scheduler = _SCHEDULERS[kind]
    return pipe


def call_kwargs(case: dict) -> dict:
    from asyncdiff_rt.tiny import call_kwargs as tiny_kwargs

    kwargs = tiny_kwargs(case["kind"], steps=case.get("steps", 4), seed=0)
    kwargs.update(case.get("call", {}))
    kwargs["output_type"] = "latent"
    return kwargs


def callback_kwargs(mode: str | None, records: list) -> dict:
    """The call's callback arguments: callback_on_step_end, or the old-style callback(i, t, latents)."""
    if mode == "old":

        def old_style(i, t, latents):
            records.append((int(i), float(t)))

        return {"callback": old_style, "callback_steps": 1}
    callback = make_callback(mode, records)
    if callback is None:
        return {}
    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


def make_callback(mode: str | None, records: list):
    """callback_on_step_end: records (step index, timestep); "edit" also scales the latents at step 1."""
    if not mode:
        return None

    def callback(pipe, i, t, callback_kwargs):
        records.append((int(i), float(t)))
        if mode == "edit" and i == 1:
            return {"latents": callback_kwargs["latents"] * 0.9}
        return callback_kwargs

    return callback


def run_call(pipe, case: dict) -> tuple[torch.Tensor, list]:
    """One pipeline call of `case`: its latents (output_type="latent") and the callback's records."""
    kwargs = call_kwargs(case)
    records: list = []
    kwargs.update(callback_kwargs(case.get("callback"), records))
    with torch.no_grad():
        out = pipe(**kwargs)
    return first_output(out).detach().clone(), records


def first_output(out) -> torch.Tensor:
    for key in ("frames", "images"):
        value = getattr(out, key, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return out[0]


def swap_scheduler(pipe, name: str) -> None:
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)


# ---- the parent's references ------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """The workers compute with one thread each (2 cores); so do the references, so that the same fp32 kernels
    run in the same order and the comparison is tight (with 2 threads SD1.5 latents move by ~1e-3 after 4 steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulated(case: dict) -> tuple[torch.Tensor, list]:
    """`asyncdiff_rt.simulators.segments` of the case, in this process."""
    from asyncdiff_rt import simulate

    pipe = build(case["kind"])
    kwargs = call_kwargs(case)
    records: list = []
    kwargs.update(callback_kwargs(case.get("callback"), records))
    with one_thread():
        out = simulate(
            pipe,
            plan=plan_of(case),
            stride=case.get("stride", 1),
            warm_up=case.get("warm_up", 1),
            time_shift=case.get("time_shift", False),
            stride_eps=case.get("stride_eps", "reuse"),
            controlnet=case.get("controlnet", "auto"),
            **kwargs,
        )
    return first_output(out).detach().clone(), records


def exact(case: dict) -> tuple[torch.Tensor, list, int]:
    """Plain diffusers (no AsyncDiff), in this process: output, callback records, and how many times the loop
    called the denoiser (PNDM with skip_prk_steps calls it steps + 1 times; img2img strength fewer)."""
    from asyncdiff_rt.tiny import denoiser_of

    pipe = build(case["kind"])
    calls = []
    handle = denoiser_of(pipe).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with one_thread():
            out, records = run_call(pipe, case)
    finally:
        handle.remove()
    return out, records, len(calls)


# ---- the worker --------------------------------------------------------------------------------------------------


def run_cases(rank: int, world: int, cases: list[dict]) -> list:
    import asyncdiff_rt

    results = []
    for case in cases:
        pipe = fresh(case["kind"])
        if case.get("scheduler_before"):
            swap_scheduler(pipe, case["scheduler_before"])
        ad = None
        try:
            ad = asyncdiff_rt.AsyncDiff(
                pipe,
                model_n=len(plan_of(case)),
                stride=case.get("stride", 1),
                warm_up=case.get("warm_up", 1),
                time_shift=case.get("time_shift", False),
                plan=plan_of(case),
                transport=case.get("transport", "gloo"),
                stride_eps=case.get("stride_eps", "reuse"),
                timeout_s=case.get("timeout_s", 60),
                drop_weights=case.get("drop_weights"),
                controlnet=case.get("controlnet", "auto"),
            )
            if case.get("swap_scheduler"):
                swap_scheduler(pipe, case["swap_scheduler"])
            calls = []
            for i in range(len(case.get("calls", [{}]))):
                v = variant(case, i)
                ad.reset_state(warm_up=v.get("warm_up", 1))
                out, records = run_call(pipe, v)
                calls.append((out if rank == 0 else None, records))
            results.append(("ok", calls))
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results.append(("error", type(err).__name__, str(err)))
        finally:
            if ad is not None:
                ad.remove()
    return results
