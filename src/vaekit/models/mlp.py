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
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from vaekit.config import ModelConfig

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


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
        if cfg.likelihood == "gaussian" and cfg.learn_sigma:
            self.log_sigma = nn.Parameter(torch.full(self.input_shape, math.log(cfg.sigma)))
        else:
            self.register_buffer("log_sigma", torch.full(self.input_shape, math.log(cfg.sigma)), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # Xavier/Glorot as in the TensorFlow tutorial
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor) -> Independent:
        """q(z|x) for x of shape (B, *input_shape): a diagonal Gaussian with batch shape (B,)."""
        h = self.encoder(x.flatten(start_dim=-len(self.input_shape)))
        mu, logvar = h.float().chunk(2, dim=-1)  # (B, D) each; float32 even under autocast
        return Independent(Normal(mu, torch.exp(0.5 * logvar), validate_args=False), 1)

    def decode(self, z: torch.Tensor) -> Independent:
        """p(x|z) for z of shape (..., D): batch shape (...), event shape input_shape."""
        out = self.decoder(z).float().unflatten(-1, self.input_shape)
        n = len(self.input_shape)
        if self.cfg.likelihood == "bernoulli":
            return Independent(Bernoulli(logits=out, validate_args=False), n)
        return Independent(Normal(out, torch.exp(self.log_sigma), validate_args=False), n)

    def prior(self) -> Independent:
        """p(z) = N(0, I) on the model's device."""
        zero = self.decoder[0].weight.new_zeros(self.latent_dim, dtype=torch.float32)
        return Independent(Normal(zero, torch.ones_like(zero), validate_args=False), 1)

    def forward(self, x: torch.Tensor) -> tuple[Distribution, torch.Tensor, Distribution]:
        """One pass: q(z|x), a reparameterized z ~ q, and p(x|z)."""
        q = self.encode(x)
        z = q.rsample()
        return q, z, self.decode(z)
