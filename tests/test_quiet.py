"""Noise: third-party messages we filter stay filtered, real ones stay visible, and a tiny pipeline under our API
raises no warnings from our own code."""

from __future__ import annotations

import logging
import warnings

import torch

from asyncdiff_rt.tools.quiet import quiet_third_party


def test_torchvision_fallback_line_is_filtered_and_others_are_not(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter, not two
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) >= 1
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        logger.warning("something else that matters")
    assert [r.getMessage() for r in caplog.records] == ["something else that matters"]


def test_tiny_pipeline_under_our_api_warns_nothing_of_ours():
    import asyncdiff_rt
    from asyncdiff_rt.tiny import call_kwargs, make_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = make_pipeline("demo", seed=0)
        pipe.set_progress_bar_config(disable=True)
        plan = [[n] for n in ("down_blocks", "up_blocks")]  # explicit: no block timing in this test
        ad = asyncdiff_rt.AsyncDiff(pipe, model_n=2, warm_up=1, transport="local", plan=plan)
        try:
            out = pipe(**{**call_kwargs("demo", steps=3, seed=0), "output_type": "latent"})
        finally:
            ad.remove()
    assert torch.isfinite(out.images).all()
    ours = [w for w in caught if "asyncdiff_rt" in w.filename.replace("\\", "/")]
    assert ours == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    # third-party ones (diffusers, torch) we allow a few of, but not a flood
    assert len(caught) <= 5, [f"{w.category.__name__}: {w.message}" for w in caught]
