"""A denoising diffusion model (notes 19.4; Ho et al., 2020) with a small U-Net, for 8 x 8 images.

Forward process: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..T, so that in
closed form x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with abar_t = prod_{s<=t} (1 - beta_s).
The U-Net predicts eps from (x_t, t, class); the loss is the mean squared error of that
prediction at a uniformly drawn t. Images live in [-1, 1] inside the model; ``sample`` returns
them in [0, 1].

Sampling: ancestral (every one of the T steps, sigma_t^2 = beta_t, the predicted x_0 clipped), or DDIM (Song et al., 2021)
on an evenly spaced subset of the steps, deterministic at eta = 0. Classifier-free guidance (Ho
& Salimans, 2022): training drops the class to a "null" class with probability ``class_dropout``,
and sampling mixes eps = (1 + w) eps(x, y) - w eps(x, null) for guidance w > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import nn as knn
from kiln.nn.cached_attention import CausalSelfAttention


@dataclass
class DiffusionConfig:
    image_size: int = 8
    num_classes: int = 10
    timesteps: int = 100
    schedule: str = "cosine"       # or "linear"
    channels: int = 32             # the U-Net's width at full resolution; doubled at each downsampling
    heads: int = 4                 # of the self-attention at the bottleneck
    class_dropout: float = 0.1     # training drops the class this often (classifier-free guidance)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                 max_beta: float = 0.999) -> Tensor:
    """Ho et al.'s linear schedule, its range scaled by 1000 / T so that abar_T is about the
    same for any number of steps (clipped at ``max_beta`` for very few steps)."""
    scale = 1000 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64).clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's schedule: abar_t = cos^2((t/T + s) / (1 + s) pi / 2), beta clipped."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the (N,) integer steps, (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the step-and-class embedding added in between, and a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), knn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = knn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), knn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = knn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Pre-norm self-attention over the pixels of a feature map (kiln's attention, not causal)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = knn.LayerNorm(channels)
        self.attn = CausalSelfAttention(channels, heads, causal=False)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)                       # (N, H W, C)
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(n, c, h, w)


class UNet(nn.Module):
    """8 x 8 -> 4 x 4 -> 2 x 2 (self-attention) -> 4 x 4 -> 8 x 8, skips across."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c, emb = config.channels, 4 * config.channels
        self.time_dim = c
        self.time_mlp = nn.Sequential(knn.Linear(c, emb, activation="silu"), knn.Linear(emb, emb))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb)   # the last index is "no class"
        self.stem = knn.Conv2d(1, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb)
        self.pool1 = knn.Conv2d(c, 2 * c, 3, stride=2, padding=1)              # 8 -> 4
        self.down2 = ResBlock(2 * c, 2 * c, emb)
        self.pool2 = knn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)          # 4 -> 2
        self.mid1 = ResBlock(2 * c, 2 * c, emb)
        self.mid_attn = Attention(2 * c, config.heads)
        self.mid2 = ResBlock(2 * c, 2 * c, emb)
        self.unpool2 = knn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1)  # 2 -> 4
        self.up2 = ResBlock(4 * c, 2 * c, emb)
        self.unpool1 = knn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1)      # 4 -> 8
        self.up1 = ResBlock(2 * c, c, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), knn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_emb(labels)
        h1 = self.down1(self.stem(x), emb)                   # 8 x 8
        h2 = self.down2(self.pool1(h1), emb)                 # 4 x 4
        h = self.mid2(self.mid_attn(self.mid1(self.pool2(h2), emb)), emb)   # 2 x 2
        h = self.up2(torch.cat([self.unpool2(h), h2], dim=1), emb)
        h = self.up1(torch.cat([self.unpool1(h), h1], dim=1), emb)
        return self.out(h)


class Diffusion(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        if config.schedule not in SCHEDULES:
            raise ValueError(f"DiffusionConfig.schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
        if config.image_size != 8:
            raise ValueError(f"DiffusionConfig.image_size: this U-Net is laid out for 8 x 8 images, got {config.image_size}")
        self.config = config
        self.unet = UNet(config)
        betas = SCHEDULES[config.schedule](config.timesteps)
        abar = torch.cumprod(1 - betas, dim=0)
        # float64 schedules, stored float32 (the model's dtype); not in the state_dict: they
        # follow from the config
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t from x_0 in closed form; t holds 0-based step indices (index 0 is step 1)."""
        abar = self.alphas_cumprod[t].reshape(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """The epsilon-prediction MSE of (N, 1, 8, 8) images in [0, 1] at uniform steps."""
        x0 = images * 2 - 1
        t = torch.randint(0, self.config.timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.config.class_dropout
            labels = labels.masked_fill(drop, self.null_class)
        return F.mse_loss(self.unet(self.q_sample(x0, t, noise), t, labels), noise)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """The predicted noise of x_t."""
        return self.unet(x, t, labels)

    def _eps(self, x: Tensor, t: int, labels: Tensor, guidance: float) -> Tensor:
        steps = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        if guidance == 0:
            return self.unet(x, steps, labels)
        both = self.unet(torch.cat([x, x]), torch.cat([steps, steps]),
                         torch.cat([labels, torch.full_like(labels, self.null_class)]))
        conditional, unconditional = both.chunk(2)
        return (1 + guidance) * conditional - guidance * unconditional

    @torch.no_grad()
    def sample(self, labels: Tensor, *, guidance: float = 0.0, ddim_steps: int | None = None,
               eta: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """(N, 64) images of ``labels`` in [0, 1]: ancestral sampling over all T steps, or DDIM
        over ``ddim_steps`` of them; ``guidance`` w > 0 for classifier-free guidance."""
        if ddim_steps is not None and not 1 <= ddim_steps <= self.config.timesteps:
            raise ValueError(f"ddim_steps must be in 1..{self.config.timesteps}, got {ddim_steps}")
        was_training = self.training
        self.eval()
        size = self.config.image_size
        x = torch.randn(len(labels), 1, size, size, generator=generator, device=labels.device,
                        dtype=self.unet.stem.weight.dtype)
        abar = self.alphas_cumprod
        if ddim_steps is None:
            for t in reversed(range(self.config.timesteps)):
                # the posterior mean of x_{t-1} given x_t and the predicted x_0, clipped to
                # the data's range (Ho et al.'s sampler; the same as the eps form unclipped)
                eps = self._eps(x, t, labels, guidance)
                beta, a_t = self.betas[t], abar[t]
                a_prev = abar[t - 1] if t > 0 else torch.ones((), device=x.device)
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                x = (beta * a_prev.sqrt() * x0 + (1 - a_prev) * (1 - beta).sqrt() * x) / (1 - a_t)
                if t > 0:
                    x = x + beta.sqrt() * torch.randn(x.shape, generator=generator, device=x.device)
        else:
            steps = torch.linspace(self.config.timesteps - 1, 0, ddim_steps).round().long().tolist()
            for i, t in enumerate(steps):
                eps = self._eps(x, t, labels, guidance)
                a_t = abar[t]
                a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else torch.ones((), device=x.device)
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
                if eta > 0 and i + 1 < len(steps):
                    x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        self.train(was_training)
        return ((x.clamp(-1, 1) + 1) / 2).reshape(len(labels), -1)
