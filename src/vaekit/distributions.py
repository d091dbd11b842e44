"""Distributions torch.distributions lacks: a two-layer Gaussian chain over z = [z1, z2].

A model with two stochastic layers (Burda et al. 2015, section 5) has
    proposal  q(z1, z2 | x) = q(z1|x) · q(z2|z1)
    prior     p(z1, z2)     = p(z2) · p(z1|z2)
Both are represented here as one distribution over the concatenation z = [z1, z2],
so the ELBO, the IWAE bound and the importance-sampled log p(x) need nothing new:
they call rsample and log_prob. KL(q ‖ p) has no closed form for this pair, so the
objectives fall back to the single-sample estimate log q(z) − log p(z).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributions import Distribution, Independent, Normal, constraints

Conditional = Callable[[torch.Tensor], Distribution]


class GaussianChain(Distribution):
    """z = [a, b] with a ~ first, b ~ second(a). Batch shape of `first`; event (d_a + d_b,)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, first: Distribution, second: Conditional, d_second: int, order: str,
                 second_fixed: Conditional | None = None):
        # order "ab": z = [a, b]; order "ba": z = [b, a] (the prior samples z2 first but we store [z1, z2]).
        # second_fixed: `second` with its network's parameters detached (for DReG's log q; see fixed()).
        self.first, self.second, self.d_second, self.order = first, second, d_second, order
        self.second_fixed = second_fixed
        d = first.event_shape[0] + d_second
        super().__init__(first.batch_shape, torch.Size([d]), validate_args=False)
        self._cache: tuple[torch.Tensor, torch.Tensor, Distribution] | None = None

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_a = self.first.event_shape[0]
        if self.order == "ab":
            return z[..., :d_a], z[..., d_a:]
        return z[..., self.d_second :], z[..., : self.d_second]

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b] if self.order == "ab" else [b, a], dim=-1)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        a = self.first.rsample(sample_shape)
        cond = self.second(a)
        z = self._join(a, cond.rsample())
        self._cache = (z, a, cond)  # log_prob(z) right after rsample reuses the conditional
        return z

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        a, b = self._split(z)
        if self._cache is not None and self._cache[0] is z:
            cond = self._cache[2]
        else:
            cond = self.second(a)
        return self.first.log_prob(a) + cond.log_prob(b)

    def fixed(self) -> GaussianChain | None:
        """This chain with its parameters held fixed: no gradient reaches them through log_prob,
        while z (a as well as b) still gets its gradient. None if the chain was built without
        second_fixed, or if `first` is not a diagonal Gaussian."""
        first = detached_normal(self.first)
        if first is None or self.second_fixed is None:
            return None
        return GaussianChain(first, self.second_fixed, self.d_second, self.order)

    @property
    def mean(self) -> torch.Tensor:
        """A plug-in summary, not the exact mean: [E a, E(b | a = E a)]."""
        a = self.first.mean
        return self._join(a, self.second(a).mean)


def detached_normal(d: Distribution) -> Independent | None:
    """A diagonal Gaussian Independent(Normal(loc, scale)) with loc and scale detached; None for anything else."""
    if not (isinstance(d, Independent) and type(d.base_dist) is Normal):
        return None
    base = d.base_dist
    return Independent(Normal(base.loc.detach(), base.scale.detach(), validate_args=False),
                       d.reinterpreted_batch_ndims, validate_args=False)
