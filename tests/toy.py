"""A toy denoiser and pipeline whose asynchronous results can be worked out by hand.

denoiser(sample, timestep) = C(B(A(sample) + timestep)) with A(x) = 2x, B(x) = x + 1, C(x) = 3x; the pipeline's
loop is x_{k+1} = x_k - 0.01 * eps_k over timesteps tau = [T, T-1, ...].
"""

from __future__ import annotations

import torch


class Scale(torch.nn.Module):
    def __init__(self, factor: float, offset: float = 0.0):
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(factor))
        self.offset = offset

    def forward(self, x):
        return self.factor * x + self.offset


class ToyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A, self.B, self.C = Scale(2.0), Scale(1.0, 1.0), Scale(3.0)

    def forward(self, sample, timestep, return_dict=False):
        h = self.A(sample) + timestep
        out = self.C(self.B(h))
        return (out,)


class ToyScheduler:
    order = 1
    begin_index = None

    def __init__(self, steps: int, first: float = 10.0):
        self.timesteps = torch.tensor([first - i for i in range(steps)], dtype=torch.float64)


class ToyPipeline:
    def __init__(self, steps: int = 6):
        self.unet = ToyDenoiser().double()
        self.scheduler = ToyScheduler(steps)

    @torch.no_grad()
    def __call__(self, x0: float = 1.0):
        x = torch.full((1, 1), x0, dtype=torch.float64)
        xs = [x]
        for t in self.scheduler.timesteps:
            eps = self.unet(x, t)[0]
            x = x - 0.01 * eps
            xs.append(x)
        return [float(v) for v in xs]


class OutOfOrderToy(ToyPipeline):
    """Calls the denoiser at step 2 with the next step's timestep, as a two-calls-per-step loop would."""

    def __init__(self, steps: int = 6, device: str = "cpu"):
        super().__init__(steps)
        self.unet.to(device)
        self.scheduler.timesteps = self.scheduler.timesteps.to(device)

    @torch.no_grad()
    def __call__(self, x0: float = 1.0):
        ts = self.scheduler.timesteps
        x = torch.full((1, 1), x0, dtype=torch.float64, device=ts.device)
        for k in range(len(ts)):
            x = x - 0.01 * self.unet(x, ts[k + 1] if k == 2 else ts[k])[0]
        return x


class ToyDiT(torch.nn.Module):
    """The toy denoiser called FLUX-style: the sample by keyword as `hidden_states`, the timestep a batch vector by
    keyword, passed as τ / 1000 and multiplied back inside (FluxTransformer2DModel does `timestep * 1000`)."""

    def __init__(self):
        super().__init__()
        self.A, self.B, self.C = Scale(2.0), Scale(1.0, 1.0), Scale(3.0)

    def forward(self, hidden_states, timestep=None, guidance=None, return_dict=False):
        h = self.A(hidden_states) + 1000 * timestep[:, None]
        return (self.C(self.B(h)),)


class ToyDiTPipeline:
    """Two rows (a batch), the loop of tests/toy.py: x_{k+1} = x_k - 0.01 eps_k, each row from its own start."""

    def __init__(self, steps: int = 6):
        self.transformer = ToyDiT().double()
        self.scheduler = ToyScheduler(steps)

    @torch.no_grad()
    def __call__(self, x0: float = 1.0):
        x = torch.tensor([[x0], [2 * x0]], dtype=torch.float64)
        xs = [x]
        for t in self.scheduler.timesteps:
            timestep = t.expand(x.shape[0]).to(x.dtype)
            eps = self.transformer(hidden_states=x, timestep=timestep / 1000, return_dict=False)[0]
            x = x - 0.01 * eps
            xs.append(x)
        return [[float(v) for v in row] for row in torch.cat(xs, dim=1)]
