"""DDPM: a denoising diffusion model with a small UNet for 28x28 digits."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kiln.models.loaded import LoadedModel
from kiln.models.zoo import register
from kiln.models.zoo.vae import GENERATION_DATASET, check_pixels


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017), as DDPM uses."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, a 1x1 skip if widths differ."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """A two-level UNet (Ronneberger et al. 2015) as in DDPM: 28 -> 14 -> 7 and back, with
    skip connections concatenated on the way up; every block sees the time embedding."""

    def __init__(self, in_channels: int = 1, width: int = 32, temb: int = 128):
        super().__init__()
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down1 = ResBlock(width, width, temb)
        self.pool1 = nn.Conv2d(width, width, 3, stride=2, padding=1)            # 28 -> 14
        self.down2 = ResBlock(width, 2 * width, temb)
        self.pool2 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)    # 14 -> 7
        self.mid = ResBlock(2 * width, 2 * width, temb)
        self.up2 = ResBlock(4 * width, 2 * width, temb)                         # 7 -> 14, with skip
        self.up1 = ResBlock(3 * width, width, temb)                             # 14 -> 28, with skip
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.width))
        h1 = self.down1(self.stem(x), temb)                                      # 28x28
        h2 = self.down2(self.pool1(h1), temb)                                    # 14x14
        h = self.mid(self.pool2(h2), temb)                                       # 7x7
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), temb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), temb)
        return self.out(h)


class DDPM(nn.Module):
    """DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): a UNet eps(x_t, t)
    trained with the simple loss ||eps - eps(x_t, t)||^2 (their eq. 14), the linear schedule
    beta_1 = 1e-4 to beta_T = 0.02 with T = 1000 (their section 4), ancestral sampling with
    sigma_t^2 = beta_t (Algorithm 2). Images live on the data scale [-1, 1].
    """

    def __init__(self, unet: nn.Module | None = None, timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, image_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.unet = unet if unet is not None else UNet(image_shape[0])
        self.timesteps, self.image_shape = timesteps, image_shape
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        # a fixed schedule, not a weight: rebuilt from the config, so kept out of checkpoints
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy images (B, C, H, W) and timesteps (B,) int64 in [0, T) -> predicted noise."""
        return self.unet(x_t, t)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)."""
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The simple noise-prediction MSE at a uniformly random t per image; `y` is unused."""
        check_pixels(x, "DDPM")
        t = torch.randint(0, self.timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        loss = F.mse_loss(self(self.q_sample(x, t, noise), t), noise)
        return loss, {"loss": loss.item()}

    def respaced(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, betas) for sampling in `steps` steps: an evenly spaced subset of the T
        timesteps, with each beta recomputed from abar so the marginals q(x_t|x_0) are those
        of the full chain (the respacing of Nichol & Dhariwal 2021, sec. 4). steps=T gives
        back the training schedule."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        ts = torch.linspace(0, self.timesteps - 1, steps).round().long().unique()
        abar = self.alphas_cumprod[ts].double()
        return ts, 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None) -> torch.Tensor:
        """n images in [-1, 1] by ancestral sampling (Algorithm 2, sigma_t^2 = beta_t) over
        `steps` respaced timesteps; None walks all T."""
        ts, betas = self.respaced(self.timesteps if steps is None else steps)
        abar = torch.cumprod(1 - betas, 0)
        device = next(self.parameters()).device
        x = torch.randn(n, *self.image_shape, device=device)
        for i in reversed(range(len(ts))):
            eps = self(x, torch.full((n,), int(ts[i]), device=device, dtype=torch.long))
            beta, ab = betas[i].item(), abar[i].item()
            # the posterior mean of Algorithm 2, line 4: (x - beta / sqrt(1 - abar) eps) / sqrt(alpha)
            x = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)
            if i > 0:
                x = x + math.sqrt(beta) * torch.randn_like(x)
        return x.clamp(-1, 1)


@register("ddpm", params=410_721, family="diffusion", task="generation", dataset=GENERATION_DATASET,
          default_input="x_t 1x1x28x28 float32, t (1,) int64",
          description="DDPM (Ho et al. 2020), two-level UNet 32/64 wide, linear betas, T=1000")
def ddpm() -> LoadedModel:
    torch.manual_seed(0)
    model = DDPM().eval()
    return LoadedModel("zoo:ddpm", model, (torch.randn(1, 1, 28, 28), torch.tensor([500])))
