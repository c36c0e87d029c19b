"""A variational autoencoder (notes 19.2) for 8 x 8 images with pixels in [0, 1].

Encoder q(z|x) = N(mu(x), diag(sigma(x)^2)), prior p(z) = N(0, I), decoder p(x|z) a Bernoulli per
pixel with logits f(z). The ELBO per image is

    E_q[log p(x|z)] - KL(q(z|x) || p(z)),

the expectation estimated with one reparameterised draw z = mu + sigma * eps, the KL in closed
form. The digits' grey levels (0..16, divided by 16) are not binary: the Bernoulli term is the
cross-entropy against the grey level, the usual "Bernoulli decoder on [0, 1] pixels", so the ELBO
is a bound on that (unnormalised) likelihood, not on a density of grey images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln import nn as knn


@dataclass
class VAEConfig:
    image_size: int = 8
    latent_dim: int = 16
    hidden: tuple[int, ...] = (512, 256)   # the encoder's widths; the decoder mirrors them


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, summed over the last dimension."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with relu fused into every one but the last."""
    last = len(sizes) - 2
    return nn.Sequential(*(knn.Linear(a, b, activation=None if i == last else "relu")
                           for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        pixels, hidden = config.image_size ** 2, list(config.hidden)
        self.encoder = _mlp([pixels, *hidden, 2 * config.latent_dim])      # -> (mu, logvar)
        self.decoder = _mlp([config.latent_dim, *reversed(hidden), pixels])  # -> Bernoulli logits

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, H*W) in [0, 1] -> mean and log-variance of q(z|x), each (N, latent_dim)."""
        mu, logvar = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's pixel probabilities (its mean image), (N, H*W)."""
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bernoulli logits of x's reconstruction from one draw of z, and q's mean and log-variance."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()    # reparameterisation
        return self.decoder(z), mu, logvar

    def elbo(self, x: Tensor) -> Tensor:
        """The ELBO of each image (nats), one sample of z: (N,)."""
        x = x.reshape(x.shape[0], -1)
        logits, mu, logvar = self(x)
        log_likelihood = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return log_likelihood - gaussian_kl(mu, logvar)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder's mean image at z = mu(x)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from the prior (mean images), (n, H*W)."""
        weight = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)
