"""The objectives, written once, in nats per example.

ELBO (Kingma & Welling 2013, eq. 10):
    L(x) = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)),
with the KL in closed form (torch.distributions.kl_divergence; for diagonal
Gaussians against N(0, I) this is Appendix B of the paper) and the expectation
estimated with one reparameterized sample z = μ + σ·ε.

IWAE bound (Burda et al. 2015, eq. 8):
    L_k(x) = E[log (1/k) Σ_i w_i],  w_i = p(x, z_i) / q(z_i|x),  z_i ~ q(z|x),
whose k = 1 case is the ELBO (with a sampled rather than closed-form KL).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Distribution, kl_divergence


class ElboParts(NamedTuple):
    """Per-example terms, each of shape (B,), in nats."""

    distortion: torch.Tensor  # −E_q[log p(x|z)]: the reconstruction term
    rate: torch.Tensor  # KL(q(z|x) ‖ p(z))
    loss: torch.Tensor  # distortion + β·rate: what training minimises

    @property
    def elbo(self) -> torch.Tensor:
        """The ELBO itself (β = 1), whatever β the loss used."""
        return -(self.distortion + self.rate)


def elbo(model, x: torch.Tensor, beta: float = 1.0) -> ElboParts:
    """ELBO parts for a batch x of shape (B, *input_shape), one sample of z each."""
    q = model.encode(x)
    z = q.rsample()  # (B, D): z = μ + σ·ε, ε ~ N(0, I)
    distortion = -model.decode(z).log_prob(x)  # (B,)
    rate = kl_divergence(q, model.prior())  # (B,), closed form
    return ElboParts(distortion, rate, distortion + beta * rate)


def log_weights(model, x: torch.Tensor, q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) − log q(z|x) for z of shape (k, B, D): returns (k, B)."""
    return model.decode(z).log_prob(x) + model.prior().log_prob(z) - q.log_prob(z)


def iwae_bound(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """L_k per example, shape (B,): logsumexp_i log w_i − log k with z_i ~ q(z|x) reparameterized."""
    q = model.encode(x)
    z = q.rsample((k,))  # (k, B, D)
    return torch.logsumexp(log_weights(model, x, q, z), dim=0) - math.log(k)
