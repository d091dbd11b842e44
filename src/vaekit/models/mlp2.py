"""Two stochastic layers (Burda et al. 2015, section 5; the IWAE paper's 784-200-200-100-100-100-50).

    q(z1|x):   x  -> hidden  -> (μ, log σ²) of z1   (latent1_dim)
    q(z2|z1):  z1 -> hidden2 -> (μ, log σ²) of z2   (latent_dim)
    p(z2) = N(0, I)
    p(z1|z2):  z2 -> hidden2 reversed -> (μ, log σ²) of z1
    p(x|z1):   z1 -> hidden reversed  -> likelihood
The latent code z handed around is the concatenation [z1, z2] (see vaekit.distributions).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaekit.config import ModelConfig
from vaekit.distributions import GaussianChain
from vaekit.models.common import (Likelihood, check_code, check_images, diag_gaussian, forward_params_detached, mlp,
                                  standard_normal, xavier_)


class TwoLayerVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        d_x, d1, d2 = math.prod(self.input_shape), cfg.latent1_dim, cfg.latent_dim
        h, h2 = list(cfg.hidden), list(cfg.hidden2)
        self.q_z1 = mlp([d_x, *h, 2 * d1], cfg.activation)
        self.q_z2 = mlp([d1, *h2, 2 * d2], cfg.activation)
        self.p_z1 = mlp([d2, *reversed(h2), 2 * d1], cfg.activation)
        self.decoder = mlp([d1, *reversed(h), d_x], cfg.activation)
        self.likelihood = Likelihood(cfg)
        xavier_(self)

    @property
    def output_layer(self) -> nn.Module:
        """The layer whose outputs are the parameters of p(x|z)."""
        return self.decoder[-1]

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent1_dim + self.cfg.latent_dim  # z = [z1, z2]

    def encode(self, x: torch.Tensor, y: None = None) -> GaussianChain:
        """q(z1, z2 | x) = q(z1|x) q(z2|z1), batch shape (B,), event (d1 + d2,)."""
        check_images(x, self.input_shape, like=self.decoder[0].weight)
        q1 = diag_gaussian(self.q_z1(x.flatten(start_dim=-len(self.input_shape))))
        return GaussianChain(q1, lambda z1: diag_gaussian(self.q_z2(z1)), self.cfg.latent_dim, order="ab",
                             second_fixed=lambda z1: diag_gaussian(forward_params_detached(self.q_z2, z1)))

    def prior(self) -> GaussianChain:
        """p(z1, z2) = p(z2) p(z1|z2), over z = [z1, z2]."""
        p2 = standard_normal(self.cfg.latent_dim, self.decoder[0].weight)
        return GaussianChain(p2, lambda z2: diag_gaussian(self.p_z1(z2)), self.cfg.latent1_dim, order="ba")

    def decode(self, z: torch.Tensor, y: None = None):
        """p(x|z1) for z = [z1, z2] of shape (..., d1 + d2); z2 is ignored given z1."""
        check_code(z, self.latent_dim)
        z1 = z[..., : self.cfg.latent1_dim]
        return self.likelihood(self.decoder(z1).unflatten(-1, self.input_shape))
