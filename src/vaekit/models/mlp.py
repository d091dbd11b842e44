"""MLP encoder/decoder VAE (Kingma & Welling 2013, appendix C.2).

Encoder: x -> hidden layers -> (μ, log σ²) of a diagonal Gaussian q(z|x).
Decoder: z -> mirrored hidden layers -> parameters of p(x|z):
  bernoulli  logits per pixel;
  gaussian   mean per pixel with a fixed σ (MSE up to a constant), or with one
             learned log σ per data dimension (`learn_sigma`).
Both methods return `torch.distributions` objects, so `log_prob`, `sample`,
`rsample` and `mean` work as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent

from vaekit.config import ModelConfig
from vaekit.models.common import Likelihood, diag_gaussian, mlp, standard_normal, xavier_


class MLPVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        d_x = math.prod(self.input_shape)
        hidden = list(cfg.hidden)
        # The encoder's last layer outputs μ and log σ² side by side: (B, 2·D).
        self.encoder = mlp([d_x, *hidden, 2 * cfg.latent_dim], cfg.activation)
        self.decoder = mlp([cfg.latent_dim, *reversed(hidden), d_x], cfg.activation)
        self.likelihood = Likelihood(cfg)
        xavier_(self)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor) -> Independent:
        """q(z|x) for x of shape (B, *input_shape): a diagonal Gaussian with batch shape (B,)."""
        return diag_gaussian(self.encoder(x.flatten(start_dim=-len(self.input_shape))))

    def decode(self, z: torch.Tensor) -> Independent:
        """p(x|z) for z of shape (..., D): batch shape (...), event shape input_shape."""
        return self.likelihood(self.decoder(z).unflatten(-1, self.input_shape))

    def prior(self) -> Independent:
        """p(z) = N(0, I) on the model's device."""
        return standard_normal(self.latent_dim, self.decoder[0].weight)

    def forward(self, x: torch.Tensor) -> tuple[Distribution, torch.Tensor, Distribution]:
        """One pass: q(z|x), a reparameterized z ~ q, and p(x|z)."""
        q = self.encode(x)
        z = q.rsample()
        return q, z, self.decode(z)
