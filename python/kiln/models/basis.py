"""Regression of a scalar function: the notes' simple families, basis expansions and the
shallow network (notes 3, 4 and 5.1-5.2).

``f(x) = sum_k theta_k phi_k(x) + theta_0``. For the families that are linear in their
parameters (linear, poly, fourier, rbf with fixed centres) the least-squares fit has a closed
form (``fit_least_squares``), the floor gradient descent must approach. The relu and sigmoid
families are the shallow network of 5.1: phi_k(x) = act(a_k x + b_k) with a_k, b_k learned, so
each ReLU unit puts a kink at x = -b_k / a_k (``kinks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kiln import nn as knn

FAMILIES = ("linear", "poly", "fourier", "rbf", "relu", "sigmoid")


@dataclass
class BasisConfig:
    family: str = "poly"
    num_basis: int = 8            # M: degree for poly, frequencies for fourier, units otherwise
    x_min: float = -3.0           # the input range: scales poly inputs, places rbf centres
    x_max: float = 3.0
    learn_centres: bool = False   # rbf: learn centres and widths (then not linear in parameters)


class BasisRegression(nn.Module):
    def __init__(self, config: BasisConfig):
        super().__init__()
        if config.family not in FAMILIES:
            raise ValueError(f"BasisRegression: family {config.family!r}; expected one of {', '.join(FAMILIES)}")
        if config.num_basis < 1:
            raise ValueError(f"BasisRegression: num_basis must be >= 1, got {config.num_basis}")
        self.config = config
        M, family = config.num_basis, config.family
        self.centre, self.half_range = (config.x_max + config.x_min) / 2, (config.x_max - config.x_min) / 2
        if family == "rbf":
            centres = torch.linspace(config.x_min, config.x_max, M)
            log_widths = torch.full((M,), math.log(2 * self.half_range / M))
            if config.learn_centres:
                self.centres, self.log_widths = nn.Parameter(centres), nn.Parameter(log_widths)
            else:
                self.register_buffer("centres", centres)
                self.register_buffer("log_widths", log_widths)
        if family in ("relu", "sigmoid"):
            self.hidden = knn.Linear(1, M, activation=family)
            # kinks spread over the input range at the start, slopes of either sign
            with torch.no_grad():
                self.hidden.weight.copy_(torch.randn(M, 1).sign() * (1 + torch.rand(M, 1)))
                kinks = config.x_min + (config.x_max - config.x_min) * torch.rand(M)
                self.hidden.bias.copy_(-self.hidden.weight[:, 0] * kinks)
        self.head = knn.Linear(self.num_features, 1)

    @property
    def num_features(self) -> int:
        M, family = self.config.num_basis, self.config.family
        return {"linear": 1, "poly": M, "fourier": 2 * M}.get(family, M)

    @property
    def linear_in_parameters(self) -> bool:
        family = self.config.family
        return family in ("linear", "poly", "fourier") or (family == "rbf" and not self.config.learn_centres)

    def features(self, x: Tensor) -> Tensor:
        """phi(x): (N, 1) -> (N, num_features); the constant phi_0 = 1 is the head's bias."""
        family, M = self.config.family, self.config.num_basis
        if family == "linear":
            return x
        if family == "poly":
            u = (x - self.centre) / self.half_range          # in [-1, 1]: a conditioned design
            return torch.cat([u ** k for k in range(1, M + 1)], dim=-1)
        if family == "fourier":
            k = torch.arange(1, M + 1, dtype=x.dtype, device=x.device)
            angle = (x - self.centre) / self.half_range * math.pi * k
            return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
        if family == "rbf":
            width = self.log_widths.exp().to(x.dtype)
            return torch.exp(-((x - self.centres.to(x.dtype)) ** 2) / (2 * width ** 2))
        return self.hidden(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def kinks(self) -> Tensor:
        """The x where each ReLU unit switches on: -b_k / a_k (notes 5.2)."""
        if self.config.family != "relu":
            raise ValueError(f"kinks: only the relu family has kinks, this is {self.config.family!r}")
        return -self.hidden.bias / self.hidden.weight[:, 0]

    @torch.no_grad()
    def fit_least_squares(self, x: Tensor, y: Tensor) -> float:
        """Sets the head to the least-squares solution on (x, y); returns its mean squared error."""
        if not self.linear_in_parameters:
            raise ValueError(f"fit_least_squares: the {self.config.family!r} family "
                             f"{'with learned centres ' if self.config.family == 'rbf' else ''}"
                             "is not linear in its parameters")
        phi = self.features(x.double())
        design = torch.cat([phi, torch.ones_like(phi[:, :1])], dim=-1)
        theta = torch.linalg.lstsq(design, y.double()).solution
        self.head.weight.copy_(theta[:-1].T)
        self.head.bias.copy_(theta[-1])
        return ((design @ theta - y.double()) ** 2).mean().item()
