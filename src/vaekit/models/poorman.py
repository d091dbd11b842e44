"""The "poor man's VAE": an autoencoder with fixed unit noise on its code.

Encoder: a deterministic MLP f(x); the code is z = f(x) + ε with ε ~ N(0, I) of FIXED
unit scale (nothing about the noise is learned). Decoder: an MLP giving the mean of a
Gaussian. Training minimises ‖x − x̂‖² + λ·‖z‖ (objectives.norm_penalty): the norm
penalty stands where the KL would be, and MSE where the log-likelihood would be.

That loss is not the ELBO of the model it samples from, and its numbers are not nats. Up to
constants it is the −ELBO of another model: q(z|x) = N(f(x), I) has a constant entropy, so
the loss is that of a prior p(z) ∝ exp(−λ‖z‖) and a decoder N(x̂, ½I). Sampling draws
z ~ N(0, I), and what `vaekit eval` reports in nats, labelled so, is log p(x) under that
model — z ~ N(0, I), x ~ N(decoder(z), σ²I) with the configured σ — estimated by importance
sampling with the fixed-noise encoder N(f(x), I) as the proposal.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, Normal

from vaekit.config import ModelConfig
from vaekit.models.common import Likelihood, check_code, check_images, mlp, standard_normal, xavier_


class PoorMansVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        d_x = math.prod(self.input_shape)
        self.encoder = mlp([d_x, *cfg.hidden, cfg.latent_dim], cfg.activation)  # f(x): the code, no variance
        self.decoder = mlp([cfg.latent_dim, *reversed(cfg.hidden), d_x], cfg.activation)
        self.likelihood = Likelihood(cfg)
        xavier_(self)

    @property
    def output_layer(self) -> nn.Module:
        """The layer whose outputs are the parameters of p(x|z)."""
        return self.decoder[-1]

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor, y: None = None) -> Independent:
        """N(f(x), I): the code plus fixed unit noise."""
        check_images(x, self.input_shape, like=self.decoder[0].weight)
        f = self.encoder(x.flatten(start_dim=-len(self.input_shape))).float()
        return Independent(Normal(f, torch.ones_like(f), validate_args=False), 1)

    def decode(self, z: torch.Tensor, y: None = None) -> Independent:
        check_code(z, self.latent_dim)
        return self.likelihood(self.decoder(z).unflatten(-1, self.input_shape))

    def prior(self) -> Independent:
        return standard_normal(self.latent_dim, self.decoder[0].weight)
