"""How far an asynchronous result is from the exact one: max and relative difference, PSNR, SSIM, LPIPS.

On random weights PSNR is a consistency check, not a quality claim (docs/architecture.md). LPIPS needs network weights
that cannot be fetched offline: `compare` reports it as unavailable unless they are already cached locally.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["compare", "format_fidelity"]


def compare(reference: torch.Tensor, test: torch.Tensor, images: bool = False) -> dict[str, Any]:
    """Fidelity of `test` against `reference` (same shape). `images=True`: NCHW in [0, 1] (adds SSIM, LPIPS)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    ref, out = reference.detach().double().cpu(), test.detach().double().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs test {tuple(out.shape)}")
    diff = (out - ref).abs()
    data_range = 1.0 if images else float(ref.max() - ref.min()) or 1.0
    result: dict[str, Any] = {
        "max_abs": float(diff.max()),
        "rel": float(torch.linalg.vector_norm(out - ref) / max(float(torch.linalg.vector_norm(ref)), 1e-30)),
        "psnr_db": float(peak_signal_noise_ratio(out, ref, data_range=data_range)),
    }
    if images:
        result["ssim"] = float(structural_similarity_index_measure(out, ref, data_range=1.0))
        result["lpips"] = _lpips(ref, out)
    return result


def _lpips(ref: torch.Tensor, out: torch.Tensor) -> float | str:
    try:
        from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

        value = learned_perceptual_image_patch_similarity(out.float() * 2 - 1, ref.float() * 2 - 1, net_type="alex")
        return float(value)
    except Exception as err:  # noqa: BLE001 - no weights offline is the expected case
        return f"unavailable ({type(err).__name__}: LPIPS weights not available offline)"


def format_fidelity(f: dict[str, Any]) -> str:
    parts = [f"max |diff| {f['max_abs']:.3g}", f"rel {f['rel']:.3g}", f"PSNR {f['psnr_db']:.2f} dB"]
    if "ssim" in f:
        parts.append(f"SSIM {f['ssim']:.4f}")
    return ", ".join(parts)
