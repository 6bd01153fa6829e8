"""Tiny random-weight diffusers pipelines built entirely in code (no downloads), for tests, demos and plans.

>>> from asyncdiff_rt.tiny import make_pipeline, call_kwargs, KINDS
>>> pipe = make_pipeline("sd15", seed=0)
>>> image = pipe(**call_kwargs("sd15", steps=4, seed=0)).images
"""

from ..tools.quiet import quiet_third_party

quiet_third_party()  # before diffusers/transformers are imported below: their torchvision notice is noise here

from .pipelines import (  # noqa: E402
    KINDS,
    VIDEO_KINDS,
    call_kwargs,
    denoiser_of,
    expected_shape,
    make_pipeline,
    output_of,
)

__all__ = ["KINDS", "VIDEO_KINDS", "call_kwargs", "denoiser_of", "expected_shape", "make_pipeline", "output_of"]
