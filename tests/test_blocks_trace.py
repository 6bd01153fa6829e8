"""Blocks and tracing (compiler.blocks, compiler.trace) on tiny UNets/DiTs built here and on the real SDXL
and SD2.1 architectures on the meta device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import nn
from torch.utils import _pytree as pytree

from asyncdiff_rt.compiler.blocks import candidate_blocks, check_no_nesting
from asyncdiff_rt.compiler.plan import Plan
from asyncdiff_rt.compiler.trace import INPUT, OUTPUT, Trace, TraceError, meta_twin, trace_denoiser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core CI machine: one thread is 3x faster than two fighting other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tiny models
def tiny_sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
    ).eval()


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def sd_inputs(batch: int = 2, hw: int = 16, cross: int = 32) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, hw, hw, generator=g), torch.tensor(10.0)), {
        "encoder_hidden_states": torch.randn(batch, 7, cross, generator=g)
    }


def sdxl_inputs(batch: int = 2, hw: int = 16) -> tuple[tuple, dict]:
    args, kwargs = sd_inputs(batch, hw)
    kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}
    return args, kwargs


def sd3_inputs(batch: int = 2, hw: int = 16) -> tuple[tuple, dict]:
    return (), {
        "hidden_states": torch.randn(batch, 4, hw, hw),
        "encoder_hidden_states": torch.randn(batch, 5, 16),
        "pooled_projections": torch.randn(batch, 8),
        "timestep": torch.full((batch,), 3.0),
    }


TINY = {
    "sd": (tiny_sd_unet, sd_inputs),
    "sdxl": (tiny_sdxl_unet, sdxl_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
}


def load_plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "benchmarks" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_meta(tree):
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, tree)


# ------------------------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("granularity", ["fine", "coarse"])
def test_candidate_blocks_never_nest_and_validate(kind, granularity):
    model = TINY[kind][0]()
    blocks = candidate_blocks(model, granularity)
    check_no_nesting(blocks)
    names = set(blocks)
    for b in blocks:
        parts = b.split(".")
        assert not any(".".join(parts[:j]) in names for j in range(1, len(parts))), b
    Plan.from_spec([blocks]).validate(model)


def test_candidate_blocks_shapes():
    sd = candidate_blocks(tiny_sd_unet())
    assert sd[0] == "conv_in" and sd[-1] == "conv_out"
    for name in (
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "down_blocks.0.attentions.0.proj_out",
        "down_blocks.0.downsamplers.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0.transformer_blocks.0",
        "mid_block.resnets.1",
        "up_blocks.0.upsamplers.0",
    ):
        assert name in sd
    assert not any(b.startswith(("time_embedding", "conv_norm_out")) for b in sd)  # replicated
    coarse = candidate_blocks(tiny_sd_unet(), "coarse")
    assert "mid_block" in coarse and "down_blocks.0.attentions.0" in coarse
    xl = candidate_blocks(tiny_sdxl_unet())
    assert "down_blocks.1.attentions.1.transformer_blocks.1" in xl
    assert candidate_blocks(tiny_sd3()) == [f"transformer_blocks.{k}" for k in range(3)]
    with pytest.raises(ValueError, match="granularity"):
        candidate_blocks(tiny_sd3(), "medium")
    with pytest.raises(ValueError, match="cannot find blocks"):
        candidate_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_real_architectures_block_counts():
    """The real SDXL / SD2.1 UNets (meta device): coarse = MEASUREMENTS' level (mid block whole), fine = inside."""
    pt = load_plan_table()
    sdxl = pt.build_unet("sdxl", device="meta")
    assert len(candidate_blocks(sdxl, "coarse")) == 32
    fine = candidate_blocks(sdxl, "fine")
    assert len(fine) == 126  # 115 parts + the input GroupNorm of each of the 11 attention models
    assert "down_blocks.2.attentions.1.transformer_blocks.9" in fine
    assert "mid_block.attentions.0.transformer_blocks.9" in fine
    sd21 = pt.build_unet("sd21", device="meta")
    assert len(candidate_blocks(sd21, "coarse")) == 44


# ------------------------------------------------------------------------------------------------ tracing
@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("granularity", ["fine", "coarse"])
def test_trace_order_is_candidate_order(kind, granularity):
    model, inputs = TINY[kind][0](), TINY[kind][1]()
    blocks = candidate_blocks(model, granularity)
    trace = trace_denoiser(model, *inputs, blocks)
    assert trace.order == blocks
    assert not trace.warnings
    assert all(trace.blocks[b].calls == 1 for b in blocks)


def test_trace_edges_hand_checked_sd():
    model = tiny_sd_unet()
    args, kwargs = sd_inputs(batch=2, hw=16)
    trace = trace_denoiser(model, args, kwargs, candidate_blocks(model))
    # 32 channels at 16x16, fp32, batch 2
    full = 2 * 32 * 16 * 16 * 4
    # resnet -> the Transformer2DModel's input norm -> proj_in (through the layout glue) -> transformer block
    e = trace.edge("down_blocks.0.resnets.0", "down_blocks.0.attentions.0.norm")
    assert e is not None and e.nbytes == full and e.shapes == [[2, 32, 16, 16]] and e.dtypes == ["float32"]
    assert trace.edge("down_blocks.0.attentions.0.norm", "down_blocks.0.attentions.0.proj_in").nbytes == full
    assert trace.edge("down_blocks.0.resnets.0", "down_blocks.0.attentions.0.proj_in") is None
    assert trace.edge("down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0")
    # the Transformer2DModel's residual: the resnet's output also reaches the downsampler
    assert trace.consumers("down_blocks.0.resnets.0") == {
        "down_blocks.0.attentions.0.norm",
        "down_blocks.0.downsamplers.0",
        "up_blocks.1.resnets.0",  # the skip connection, through res_samples slicing and torch.cat in the up block
    }
    # the very first skip (conv_in's output) is consumed by the last up resnet
    assert "up_blocks.1.resnets.1" in trace.consumers("conv_in")
    assert trace.output_sources() == {"conv_out"}
    assert trace.consumers("conv_out") == {OUTPUT}
    assert trace.edge("conv_out", OUTPUT).nbytes == 2 * 4 * 16 * 16 * 4
    # no edge skips the chain where there is no data flow
    assert trace.edge("conv_in", "down_blocks.0.attentions.0.proj_in") is None
    # the timestep reaches every resnet through the replicated time embedding
    assert trace.edge(INPUT, "mid_block.resnets.1").leaves == [1]
    # needed_by: the up resnet needs its predecessor and the skip, which is the attention's proj_out plus the
    # Transformer2DModel's residual (the down resnet's output); not the attention's norm, which a rank that only
    # replays that attention model therefore skips
    assert trace.needed_by({"up_blocks.1.resnets.0"}) == {
        "up_blocks.0.upsamplers.0",
        "down_blocks.0.attentions.0.proj_out",
        "down_blocks.0.resnets.0",
    }
    assert trace.needed_by({"conv_out"}) == {"up_blocks.1.resnets.1", "up_blocks.1.attentions.1.proj_out"}


def test_trace_sd3_tuple_outputs():
    model = tiny_sd3()
    trace = trace_denoiser(model, *sd3_inputs(), candidate_blocks(model))
    e = trace.edge("transformer_blocks.0", "transformer_blocks.1")
    assert e.leaves == [0, 1] and e.shapes == [[2, 5, 16], [2, 64, 16]]
    # the last block (context_pre_only) returns (None, hidden_states): only leaf 1 is a tensor
    assert trace.blocks["transformer_blocks.2"].outputs[0] is None
    assert trace.output_sources() == {"transformer_blocks.2"}
    assert trace.edge("transformer_blocks.2", OUTPUT).leaves == [1]
    assert trace.edge("transformer_blocks.0", "transformer_blocks.2") is None


@pytest.mark.parametrize("kind", list(TINY))
def test_meta_trace_equals_real_trace(kind):
    model, (args, kwargs) = TINY[kind][0](), TINY[kind][1]()
    blocks = candidate_blocks(model)
    real = trace_denoiser(model, args, kwargs, blocks)
    twin = meta_twin(model)
    assert all(p.is_meta for p in twin.parameters())
    margs, mkwargs = to_meta((args, kwargs))
    fake = trace_denoiser(twin, margs, mkwargs, blocks)
    assert fake.to_dict()["edges"] == real.to_dict()["edges"]
    assert fake.order == real.order
    assert fake.meta["device"] == "meta"


def test_trace_json_round_trip():
    model = tiny_sdxl_unet()
    trace = trace_denoiser(model, *sdxl_inputs(), candidate_blocks(model))
    again = Trace.from_json(trace.to_json())
    assert again.to_dict() == trace.to_dict()
    assert again.consumers("conv_in") == trace.consumers("conv_in")


def test_trace_controlnet_residuals_are_inputs():
    """ControlNet residuals enter as denoiser inputs, added by glue: edges from <input>, the chain unchanged."""
    model = tiny_sd_unet()
    args, kwargs = sd_inputs()
    plain = trace_denoiser(model, args, kwargs, candidate_blocks(model))
    with torch.no_grad():
        res = [torch.randn(2, 32, 16, 16), torch.randn(2, 32, 16, 16), torch.randn(2, 32, 8, 8)]
        res += [torch.randn(2, 64, 8, 8)]
    kw = dict(
        kwargs, down_block_additional_residuals=tuple(res), mid_block_additional_residual=torch.randn(2, 64, 8, 8)
    )
    trace = trace_denoiser(model, args, kw, candidate_blocks(model))
    assert trace.block_edges() == plain.block_edges()
    assert INPUT in {e.src for e in trace.edges if e.dst == "up_blocks.0.resnets.0"}


class _InPlaceToy(nn.Module):
    """Glue with views and in-place writes: every way data can sneak from one block to another."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x, y):
        h = self.a(x)  # [2, 4]
        v = h.view(8)
        v += 1  # in place through a view: still a's data only
        z = self.b(y)
        h[:, :2] += z[:, :2]  # in place into a slice of a's output: h now carries a and b
        skip = (h, z)
        out = self.c(skip[0])
        w = torch.zeros_like(x)
        w.copy_(z)  # copy_ into a fresh buffer: b only
        return self.d(w) + out


def test_trace_in_place_glue_and_views():
    toy = _InPlaceToy().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    trace = trace_denoiser(toy, (x, y), {}, ["a", "b", "c", "d"])
    assert trace.order == ["a", "b", "c", "d"]
    assert {(e.src, e.dst) for e in trace.block_edges()} == {("a", "c"), ("b", "c"), ("b", "d")}
    assert trace.output_sources() == {"c", "d"}
    assert trace.edge(INPUT, "a").leaves == [0] and trace.edge(INPUT, "b").leaves == [1]
    meta = trace_denoiser(meta_twin(toy), *to_meta(((x, y), {})), ["a", "b", "c", "d"])
    assert meta.to_dict()["edges"] == trace.to_dict()["edges"]
    assert trace.needed_by({"c", "d"}) == {"a", "b"}
    assert trace.needed_by({"a"}) == set()


def test_trace_rejects_nested_and_unknown_blocks():
    toy = _InPlaceToy()
    with pytest.raises(ValueError, match="parent"):
        trace_denoiser(toy, (torch.randn(2, 4), torch.randn(2, 4)), {}, ["a", "a.weight"])
    with pytest.raises(TraceError, match="no module"):
        trace_denoiser(toy, (torch.randn(2, 4), torch.randn(2, 4)), {}, ["e"])


def test_trace_real_sdxl_on_meta():
    """The real SDXL-1024 architecture traces on the meta device on a CPU; the largest output is 42 MB."""
    pt = load_plan_table()
    unet = pt.build_unet("sdxl", device="meta", dtype=torch.float16)
    args, kwargs = pt.unet_inputs(unet, 1024, 1024, 2, torch.float16, "meta")
    blocks = candidate_blocks(unet)
    trace = trace_denoiser(unet, args, kwargs, blocks)
    assert trace.order == blocks and not trace.warnings
    assert max(r.nbytes for r in trace.blocks.values()) == 2 * 640 * 128 * 128 * 2  # the last upsampler
    assert trace.output_sources() == {"conv_out"}


@pytest.mark.parametrize("kind", ["svd", "animatediff", "sd_upscale"])
def test_video_and_upscaler_denoisers(kind):
    """SVD, AnimateDiff (UNetMotionModel) and the x4 upscaler from the shared tiny pipelines: the structural
    order is the call order, and the meta twin traces the same edges as a real forward."""
    import asyncdiff_rt.tiny as tiny
    from asyncdiff_rt.models import default_batch, example_inputs

    pipe = tiny.make_pipeline(kind, seed=0)
    den = tiny.denoiser_of(pipe)
    extra = {"num_frames": 3} if kind in ("svd", "animatediff") else {}
    args, kwargs = example_inputs(den, 64, 64, default_batch(den), torch.float32, "cpu", pipe, **extra)
    for granularity in ("fine", "coarse"):
        blocks = candidate_blocks(den, granularity)
        real = trace_denoiser(den, args, kwargs, blocks)
        assert real.order == blocks and not real.warnings
        assert real.output_sources() == {"conv_out"}
        fake = trace_denoiser(meta_twin(den), *to_meta((args, kwargs)), blocks)
        assert fake.to_dict()["edges"] == real.to_dict()["edges"]
