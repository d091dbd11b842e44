"""MLP encoder/decoder VAE (Kingma & Welling 2013, appendix C.2).

Encoder: x -> hidden layers -> (μ, log σ²) of a diagonal Gaussian q(z|x).
Decoder: z -> mirrored hidden layers -> parameters of p(x|z):
  bernoulli  logits per pixel;
  gaussian   mean per pixel with a fixed σ (MSE up to a constant), or with one
             learned log σ per data dimension (`learn_sigma`).
With n_classes > 0 it is a conditional VAE (Sohn et al. 2015): q(z|x, y) and p(x|z, y), the
one-hot label joined to the input of both networks; encode and decode then need y.
Both methods return `torch.distributions` objects, so `log_prob`, `sample`,
`rsample` and `mean` work as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent

from vaekit.config import ModelConfig
from vaekit.models.common import (Likelihood, check_code, check_images, diag_gaussian, join_label, mlp,
                                  standard_normal, xavier_)


class MLPVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        d_x = math.prod(self.input_shape)
        hidden = list(cfg.hidden)
        # The encoder's last layer outputs μ and log σ² side by side: (B, 2·D).
        c = cfg.n_classes
        self.encoder = mlp([d_x + c, *hidden, 2 * cfg.latent_dim], cfg.activation)
        self.decoder = mlp([cfg.latent_dim + c, *reversed(hidden), d_x], cfg.activation)
        self.likelihood = Likelihood(cfg)
        xavier_(self)

    @property
    def output_layer(self) -> nn.Module:
        """The layer whose outputs are the parameters of p(x|z)."""
        return self.decoder[-1]

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Independent:
        """q(z|x) for x of shape (B, *input_shape): a diagonal Gaussian with batch shape (B,)."""
        check_images(x, self.input_shape, like=self.decoder[0].weight)
        h = join_label(x.flatten(start_dim=-len(self.input_shape)), y, self.cfg.n_classes)
        return diag_gaussian(self.encoder(h))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Independent:
        """p(x|z) for z of shape (..., B, D): batch shape (..., B), event shape input_shape."""
        check_code(z, self.latent_dim)
        return self.likelihood(self.decoder(join_label(z, y, self.cfg.n_classes)).unflatten(-1, self.input_shape))

    def prior(self) -> Independent:
        """p(z) = N(0, I) on the model's device."""
        return standard_normal(self.latent_dim, self.decoder[0].weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[Distribution, torch.Tensor, Distribution]:
        """One pass: q(z|x), a reparameterized z ~ q, and p(x|z)."""
        q = self.encode(x, y)
        z = q.rsample()
        return q, z, self.decode(z, y)
