"""A conditional DCGAN (notes 19.3) for 8 x 8 images with pixels in [0, 1].

The generator maps noise and a class to an image through transposed convolutions (2 -> 4 -> 8
pixels, batch norm and relu between); the discriminator reads the image with strided
convolutions (8 -> 4 -> 2, leaky relu, no batch norm so a batch of fakes and a batch of reals
are judged alike) and is conditioned by projection (Miyato & Koyama, 2018): its logit is
``w . [h, s] + embed(y) . h`` for the image features h and s, their spread within the class.

``losses`` gives the non-saturating losses of both players on one batch,

    D: -log D(x, y) - log(1 - D(G(z, y), y))        G: -log D(G(z, y), y),

the generator's plus ``mode_seeking`` / (mean |G(z1, y) - G(z2, y)| / mean |z1 - z2|) (Mao et al.,
2019: without it the generator drew nearly one image per class; on the default run it took the
Frechet distance from 15.6 to about 3.5). The generator's loss sees a frozen copy of the
discriminator's weights, so the sum of the two has each player's gradient in its own parameters:
one optimizer step on the sum is a simultaneous update of both (Adam keeps its moments per
parameter, so one Adam over both is two Adams with the same settings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kiln import nn as knn


@dataclass
class GANConfig:
    image_size: int = 8
    num_classes: int = 10
    noise_dim: int = 32
    channels: int = 64        # the generator's last and the discriminator's first width; doubled once
    dropout: float = 0.2      # in the discriminator, before its logit
    mode_seeking: float = 0.2  # weight of the mode-seeking term in the generator's loss (0: off)


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        if config.image_size != 8:
            raise ValueError(f"GANConfig.image_size: this DCGAN is laid out for 8 x 8 images, got {config.image_size}")
        c = config.channels
        self.embed = nn.Embedding(config.num_classes, config.noise_dim)
        self.project = nn.Sequential(knn.Linear(2 * config.noise_dim, 2 * c * 2 * 2, bias=False),
                                     nn.Unflatten(1, (2 * c, 2, 2)), knn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.Sequential(knn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, bias=False),   # 4 x 4
                                knn.BatchNorm2d(c), nn.ReLU(),
                                knn.ConvTranspose2d(c, 1, 4, stride=2, padding=1))                  # 8 x 8

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """(N, noise_dim) noise and (N,) classes -> (N, 1, 8, 8) images in [0, 1]."""
        return torch.sigmoid(self.up(self.project(torch.cat([z, self.embed(labels)], dim=1))))


def class_spread(h: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(N, 1): for each row, the mean over features of the standard deviation of h among the
    batch's rows of its class (0 for a class seen once)."""
    onehot = F.one_hot(labels, num_classes).to(h.dtype)               # (N, K)
    counts = onehot.sum(0).clamp_min(1)                                # (K,)
    mean = (onehot.T @ h) / counts[:, None]                            # (K, D)
    var = (onehot.T @ (h - mean[labels]).square()) / counts[:, None]   # (K, D)
    return (var + 1e-8).sqrt().mean(1)[labels][:, None]


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        c = config.channels
        self.features = nn.Sequential(knn.Conv2d(1, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),      # 4 x 4
                                      knn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 2 x 2
                                      knn.Flatten(), nn.Dropout(config.dropout))
        # + 1: the minibatch standard deviation (Karras et al., 2018) within each image's class,
        # which lets the discriminator see a class whose fakes are all alike (without it the
        # generator ignored its noise and drew one image per class)
        self.logit = knn.Linear(2 * c * 2 * 2 + 1, 1)
        self.embed = nn.Embedding(config.num_classes, 2 * c * 2 * 2)   # the class projection

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """(N, 1, 8, 8) images in [0, 1] and their classes -> (N,) logits of "real"."""
        h = self.features(images * 2 - 1)
        spread = class_spread(h, labels, self.embed.num_embeddings)
        return self.logit(torch.cat([h, spread], dim=1)).squeeze(-1) + (self.embed(labels) * h).sum(-1)


class ConditionalGAN(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def forward(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images of the given classes from fresh noise, (N, 1, 8, 8)."""
        dtype = self.generator.embed.weight.dtype
        z = torch.randn(len(labels), self.config.noise_dim, generator=generator, device=labels.device, dtype=dtype)
        return self.generator(z, labels)

    def losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The discriminator's and the generator's non-saturating losses (batch means) on real
        ``images`` (N, 1, 8, 8) and as many fakes of the same classes."""
        dtype = self.generator.embed.weight.dtype
        z = torch.randn(2, len(labels), self.config.noise_dim, device=labels.device, dtype=dtype)
        fake = self.generator(z[0], labels)
        d = self.discriminator
        real_logits, fake_logits = d(images, labels), d(fake.detach(), labels)
        d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        g_loss = F.softplus(-functional_call(d, frozen, (fake, labels))).mean()
        if self.config.mode_seeking > 0:
            # mode seeking (Mao et al., 2019): two noises of one class should give two images
            other = self.generator(z[1], labels)
            ratio = (fake - other).abs().mean((1, 2, 3)) / (z[0] - z[1]).abs().mean(1)
            g_loss = g_loss + self.config.mode_seeking / (ratio.mean() + 1e-5)
        return d_loss, g_loss

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(N, 64) images of ``labels`` in [0, 1], in eval mode (batch norm's running statistics)."""
        was_training = self.training
        self.eval()
        out = self(labels, generator).reshape(len(labels), -1)
        self.train(was_training)
        return out
