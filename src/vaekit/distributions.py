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

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch.distributions import Distribution, Independent, Normal, constraints

from vaekit.errors import ConfigError

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
        self._cache: tuple[torch.Tensor, int | None, bool, Distribution] | None = None

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_a = self.first.event_shape[0]
        if self.order == "ab":
            return z[..., :d_a], z[..., d_a:]
        return z[..., self.d_second :], z[..., : self.d_second]

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b] if self.order == "ab" else [b, a], dim=-1)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.from_noise(draw_noise(self, sample_shape))

    def from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """The sample whose standard-normal noise is eps (…, d_a + d_b), laid out as z is: a from
        its share of eps, then b from q(b|a) and its share. Reparameterized: the graph reaches
        the parameters of both parts."""
        eps_a, eps_b = self._split(eps)
        a = from_noise(self.first, eps_a)
        cond = self.second(a)
        z = self._join(a, from_noise(cond, eps_b))
        # log_prob(z) of this very z reuses the conditional, while z is unchanged and if its graph is
        # as log_prob's would be (a z drawn by sample(), without a graph, gets a fresh one). Compiled
        # code edits no z in place, and reading a tensor's version there would break its graph; an
        # inference tensor has no version to read.
        version = None if torch.compiler.is_compiling() or z.is_inference() else z._version
        self._cache = (z, version, torch.is_grad_enabled(), cond)
        return z

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        a, b = self._split(z)
        cached = self._cache
        if (cached is not None and cached[0] is z
                and (torch.compiler.is_compiling() or cached[1] is None or cached[1] == z._version)
                and (cached[2] or not torch.is_grad_enabled())):
            cond = cached[3]
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


@contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """A block whose random draws on ``device`` (and on the CPU) start from ``seed``, the random
    state outside left as it was on both; no-op for None. Other devices are not touched (where
    torch.manual_seed would seed every CUDA device)."""
    device = torch.device(device)
    if seed is None:
        yield
        return
    try:
        seed = operator.index(seed)  # numpy's integers too
    except TypeError:
        raise ConfigError(f"a seed must be a whole number (or None), got {seed!r}.") from None
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.random.default_generator.manual_seed(seed)
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:  # other accelerators: torch.manual_seed seeds every device of the type
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            torch.manual_seed(seed)
            yield


def draw_noise(d: Distribution, sample_shape=torch.Size()) -> torch.Tensor:
    """ε ~ N(0, I) shaped like d.rsample(sample_shape), for from_noise(d, ε): what Normal.rsample
    draws, in the order a chain samples (its first part, then its second), so in eager mode one
    seed gives the z it gave before these helpers existed (our conditionals draw no random numbers).
    For a diagonal Gaussian or a GaussianChain of them; anything else raises ConfigError."""
    return noise_drawer(d)(torch.Size(sample_shape) + d.batch_shape)


def noise_drawer(d: Distribution) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A function of a shape S that draws what draw_noise would for any distribution built like d
    (the same kind, event sizes, dtype and device) whose sample and batch shapes together are S:
    a batch's noise without encoding the batch first (compiled training draws it outside its graph)."""
    if isinstance(d, GaussianChain):
        first, base = noise_drawer(d.first), _diag_normal_base(d.first)
        return lambda shape: d._join(first(shape), torch.randn(*shape, d.d_second, dtype=base.loc.dtype,
                                                                device=base.loc.device))
    base, event = _diag_normal_base(d), d.event_shape
    return lambda shape: torch.randn(torch.Size(shape) + event, dtype=base.loc.dtype, device=base.loc.device)


def from_noise(d: Distribution, eps: torch.Tensor) -> torch.Tensor:
    """The reparameterized sample of d whose standard-normal noise is eps: μ + σ·ε for a diagonal
    Gaussian (Normal.rsample's formula), GaussianChain.from_noise for a chain. eps may have
    leading sample dimensions, and need not be one draw_noise gave: a subset of one gives the
    same samples (to float rounding for a chain, whose second network then runs on another
    batch), each with its graph, at the cost of that subset only."""
    if isinstance(d, GaussianChain):
        return d.from_noise(eps)
    base = _diag_normal_base(d)
    return base.loc + eps * base.scale


def has_graph(d: Distribution) -> bool:
    """Whether samples of d (a diagonal Gaussian or a GaussianChain of them) would get a graph:
    autograd is on and the parameters of d's (first) Gaussian have one."""
    base = _diag_normal_base(d.first if isinstance(d, GaussianChain) else d)
    return torch.is_grad_enabled() and (base.loc.requires_grad or base.scale.requires_grad)


def _diag_normal_base(d: Distribution) -> Normal:
    if type(d) is Normal:
        return d
    if isinstance(d, Independent) and type(d.base_dist) is Normal:
        return d.base_dist
    raise ConfigError(f"sampling from given noise (GaussianChain, iwae's grad_samples) needs a diagonal Gaussian "
                      f"or a GaussianChain of them, not {type(d).__name__}.")


def detached_normal(d: Distribution) -> Independent | None:
    """A diagonal Gaussian Independent(Normal(loc, scale)) with loc and scale detached; None for anything else."""
    if not (isinstance(d, Independent) and type(d.base_dist) is Normal):
        return None
    base = d.base_dist
    return Independent(Normal(base.loc.detach(), base.scale.detach(), validate_args=False),
                       d.reinterpreted_batch_ndims, validate_args=False)
