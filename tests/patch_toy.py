"""A toy denoiser and pipeline for the patch simulator, small enough to work out by hand (DESIGN §10).

    h = conv_in(sample) + 0.1 * t                 3x3, reads the full latent
    g = silu(norm(h))                             GroupNorm, 2 groups
    a = g + attn(tokens(g))                       diffusers self-attention over row-major tokens
    u = h + upsample2(down(a))                    3x3 stride-2 conv, then nearest x2 (a level down and up)
    eps = conv_out(u)                             3x3

The pipeline's loop: x_{k+1} = x_k - 0.2 * eps_k over the given timesteps, batch 2 (a CFG-like batch that patches
must not split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

CHANNELS, HIDDEN, GROUPS = 3, 4, 2


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def untokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(like.shape)


class PatchToyNet(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(CHANNELS, HIDDEN, 3, padding=1)
        self.norm = torch.nn.GroupNorm(GROUPS, HIDDEN, eps=1e-5)
        self.attn = Attention(query_dim=HIDDEN, heads=1, dim_head=HIDDEN)
        self.down = torch.nn.Conv2d(HIDDEN, HIDDEN, 3, stride=2, padding=1)
        self.conv_out = torch.nn.Conv2d(HIDDEN, CHANNELS, 3, padding=1)
        with torch.no_grad():  # GroupNorm's default affine is the identity: make it matter
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        self.double().eval()

    def forward(self, sample, timestep, return_dict=False):
        h = self.conv_in(sample) + 0.1 * timestep
        g = F.silu(self.norm(h))
        a = g + untokens(self.attn(tokens(g)), g)
        u = h + F.interpolate(self.down(a), scale_factor=2.0, mode="nearest")
        return (self.conv_out(u),)


class PatchToyPipeline:
    def __init__(self, timesteps=(10.0, 9.0, 8.0, 7.0), seed: int = 0):
        self.unet = PatchToyNet(seed)
        self.timesteps = list(timesteps)
        self.eps: list[torch.Tensor] = []  # each step's denoiser output, for per-step checks

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x, self.eps = x0, []
        for t in self.timesteps:
            self.eps.append(self.unet(x, t)[0])
            x = x - 0.2 * self.eps[-1]
        return x


def toy_latent(rows: int = 12, cols: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, CHANNELS, rows, cols, generator=g, dtype=torch.float64)
