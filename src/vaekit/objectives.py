"""The objectives, written once, in nats per example.

ELBO (Kingma & Welling 2013, eq. 10):
    L(x) = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)),
with the KL in closed form (torch.distributions.kl_divergence; for diagonal
Gaussians against N(0, I) this is Appendix B of the paper) and the expectation
estimated with one reparameterized sample z = μ + σ·ε.

IWAE bound (Burda et al. 2015, eq. 8):
    L_k(x) = E[log (1/k) Σ_i w_i],  w_i = p(x, z_i) / q(z_i|x),  z_i ~ q(z|x),
whose k = 1 case is the ELBO (with a sampled rather than closed-form KL). Its
gradient can be taken as is or, for the encoder, doubly reparameterized (DReG;
Tucker et al. 2019): the same expectation with less variance.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple

import torch
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaekit.distributions import GaussianChain, detached_normal, draw_noise, from_noise, has_graph
from vaekit.errors import ConfigError


def encode(model, x: torch.Tensor, y: torch.Tensor | None = None) -> Distribution:
    """q(z|x), or q(z|x, y) for a conditional model; models without labels are called as encode(x)."""
    return model.encode(x) if y is None else model.encode(x, y)


def decode(model, z: torch.Tensor, y: torch.Tensor | None = None) -> Distribution:
    """p(x|z), or p(x|z, y) for a conditional model; models without labels are called as decode(z)."""
    return model.decode(z) if y is None else model.decode(z, y)


class ElboParts(NamedTuple):
    """Per-example terms, each of shape (B,), in nats."""

    distortion: torch.Tensor  # −E_q[log p(x|z)]: the reconstruction term
    rate: torch.Tensor  # KL(q(z|x) ‖ p(z))
    loss: torch.Tensor  # distortion + β·rate: what training minimises

    @property
    def elbo(self) -> torch.Tensor:
        """The ELBO itself (β = 1), whatever β the loss used."""
        return -(self.distortion + self.rate)


def elbo(model, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0, k: int = 1,
         y: torch.Tensor | None = None) -> ElboParts:
    """ELBO parts for a batch x of shape (B, *input_shape), with k samples of z each (default 1).

    k > 1 averages the reconstruction term over k samples: the "VAE with k samples" of Burda et
    al. 2015 (Table 1), whose objective is still the ELBO, only estimated with less noise.
    beta weights the KL in the loss (β-VAE; Higgins et al. 2017). free_bits > 0 puts a floor of
    that many nats under each latent dimension's KL in the loss (Kingma et al. 2016, eq. 15),
    applied per example; the reported rate stays the true KL. y: the labels, for a conditional model.
    """
    check_count(k, "k (samples of z per example)")
    _check_beta(beta)
    q = encode(model, x, y)
    z = q.rsample() if k == 1 else q.rsample((k,))  # (B, D) or (k, B, D): z = μ + σ·ε, ε ~ N(0, I)
    p = model.prior()
    distortion = -decode(model, z, y).log_prob(x)  # (B,) or (k, B)
    rate = kl(q, p, z)  # (B,)
    if k > 1:
        distortion = distortion.mean(0)
    penalised = rate if free_bits <= 0 else kl_per_dim(q, p).clamp(min=free_bits).sum(-1)
    return ElboParts(distortion, rate, distortion + beta * penalised)


def kl_per_dim(q: Distribution, p: Distribution) -> torch.Tensor:
    """Closed-form KL of each latent dimension, (B, D), for factorised q and p."""
    if not (isinstance(q, Independent) and isinstance(p, Independent)):
        raise ConfigError("free bits need a factorised q(z|x) and p(z), which this model does not have.")
    if _is_diag_normal(q) and _is_diag_normal(p):
        return normal_kl(q.base_dist, p.base_dist)
    return kl_divergence(q.base_dist, p.base_dist)


def kl(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) in closed form where torch.distributions knows one, else log q(z) − log p(z) at z ~ q.

    The fallback is the unbiased sampled estimate, averaged over any leading sample dimensions
    of z; it serves models whose q or p has no closed-form KL (two stochastic layers,
    vaekit.distributions.GaussianChain).
    """
    if _is_diag_normal(q) and _is_diag_normal(p):
        return normal_kl(q.base_dist, p.base_dist).flatten(-q.reinterpreted_batch_ndims).sum(-1)
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        log_ratio = q.log_prob(z) - p.log_prob(z)
        return log_ratio.reshape(-1, *q.batch_shape).mean(0)


def _is_diag_normal(d: Distribution) -> bool:
    return isinstance(d, Independent) and isinstance(d.base_dist, Normal)


def normal_kl(q: Normal, p: Normal) -> torch.Tensor:
    """KL(N(μq, σq²) ‖ N(μp, σp²)) per element: log(σp/σq) + (σq² + (μq − μp)²) / (2σp²) − ½.

    What torch.distributions computes, written out so that torch.compile traces it in one graph
    (kl_divergence's dispatch on types is a graph break). The log of the variance ratio is taken as
    a difference of logs: the ratio itself underflows in float32 once σq/σp < 1e-19 or so (a
    posterior the encoder has made very sure), where kl_divergence returns inf. (σq = exp(½ log σq²)
    itself is 0 below log σq² ≈ −207, and there the KL is inf all the same.)
    """
    log_ratio = 2 * (q.scale.log() - p.scale.log())  # log(σq² / σp²)
    t = ((q.loc - p.loc) / p.scale).pow(2)
    return 0.5 * (log_ratio.exp() + t - 1 - log_ratio)


def log_weights(model, x: torch.Tensor, q: Distribution, z: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) − log q(z|x) for z of shape (k, B, D): returns (k, B)."""
    return decode(model, z, y).log_prob(x) + model.prior().log_prob(z) - q.log_prob(z)


def _check_beta(beta: float | torch.Tensor) -> None:
    """A KL weight given as a number must not be negative (a tensor is training's warm-up schedule's)."""
    if isinstance(beta, (int, float)) and not beta >= 0:
        raise ConfigError(f"beta (the KL weight) must be a number >= 0, got {beta!r}.")


def check_count(value: int | None, what: str, optional: bool = False) -> None:
    """ConfigError unless value is a whole number >= 1 (or, if optional, None); `what` names it."""
    if optional and value is None:
        return
    try:
        whole = not isinstance(value, bool) and operator.index(value) >= 1  # numpy's integers too
    except TypeError:
        whole = False
    if not whole:
        raise ConfigError(f"{what} must be a whole number >= 1{' or None' if optional else ''}, got {value!r}.")


def iwae_bound(model, x: torch.Tensor, k: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """L_k per example, shape (B,): logsumexp_i log w_i − log k with z_i ~ q(z|x) reparameterized."""
    return iwae(model, x, k, y).elbo_k


class IwaeParts(NamedTuple):
    """Per-example terms of the IWAE objective, each (B,), in nats."""

    distortion: torch.Tensor  # −(1/k) Σ_i log p(x|z_i): the k samples' average reconstruction term
    rate: torch.Tensor  # (1/k) Σ_i [log q(z_i|x) − log p(z_i)]: their average sampled KL
    loss: torch.Tensor  # −L_k (its β-weighted form for β ≠ 1): what training minimises

    @property
    def elbo_k(self) -> torch.Tensor:
        """L_k (for β = 1)."""
        return -self.loss


def iwae(model, x: torch.Tensor, k: int, y: torch.Tensor | None = None,
         beta: float | torch.Tensor = 1.0, dreg: bool = False, terms: Callable | None = None,
         grad_samples: int = 0) -> IwaeParts:
    """The IWAE objective with k samples; distortion + rate is the k-sample average ELBO (≥ −L_k).

    beta ≠ 1 weights log p(z) − log q(z|x) inside each log-weight, as β weights the KL in the
    ELBO: the loss is then −logsumexp_i [log p(x|z_i) + β (log p(z_i) − log q(z_i|x))] + log k,
    which is −L_k at β = 1 and, at k = 1, the ELBO's distortion + β·rate (a KL warm-up for IWAE).

    dreg=True changes the encoder's gradient of ``loss``, not its value: the doubly
    reparameterized estimator (Tucker et al. 2019, eq. 5). q's parameters are held fixed where
    log q(z_i|x) is evaluated, so the encoder gets its gradient through the samples z_i alone,
    and each sample's gradient is scaled by (1 − β) + β·w̃_i, where w̃ are the normalised
    weights (w̃_i² overall at β = 1). Same expectation as the plain gradient (tested), lower
    variance in practice (Tucker et al. measure it), where the plain IWAE encoder gradient's
    signal-to-noise ratio falls as k grows (Rainforth et al. 2018).
    The decoder's gradient is unchanged. The hook is on z, so it shapes the gradient of whatever
    is backpropagated from this call: backpropagate ``loss`` only (training does). With the
    default terms log q comes from q's own parameters, detached; the encoder is not run again.
    `--compile` trains with dreg through dreg_from_noise instead, which needs no hook.

    terms: what computes dreg_terms (the default) when every sample gets a backward pass, e.g.
    a compiled or an older version of it (bench/iwae_step.py times them); unused with grad_samples.

    grad_samples (with dreg, when q has a graph; 0: all): backpropagate through this many of
    each example's k samples, drawn by their weights, not all of them; see dreg_from_noise.
    ``loss`` keeps its value. q must then be a diagonal Gaussian or a GaussianChain of them.
    """
    check_count(k, "k (samples of z per example)")
    _check_beta(beta)
    q = encode(model, x, y)
    if dreg and 0 < grad_samples < k and has_graph(q):
        return dreg_from_noise(model, x, y, draw_noise(q, (k,)), None, beta, grad_samples, q=q)
    z = q.rsample((k,))  # (k, B, D)
    dreg = dreg and z.requires_grad
    if dreg:
        log_px_z, log_ratio = dreg_terms(model, x, y, z, q) if terms is None else terms(model, x, y, z)
    else:
        log_px_z, log_ratio = _terms(model, x, y, q, z)
    log_w = log_px_z + beta * log_ratio  # 1.0 · r is r, bit for bit
    if dreg:
        _dreg_reweight(z, torch.softmax(log_w.detach(), dim=0), beta)  # w̃ (k, B), the normalised weights
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return IwaeParts(-log_px_z.mean(0), -log_ratio.mean(0), -bound)


def _dreg_reweight(z: torch.Tensor, w: torch.Tensor, beta: float | torch.Tensor) -> None:
    """DReG's factor on the gradient that reaches the samples z (…, B, D) of normalised weights w (…, B):
    d(loss)/dz_i is already w̃_i · d(log w_i)/dz_i, and DReG weights it by w̃_i once more."""
    scale = ((1 - beta) + beta * w).unsqueeze(-1)
    z.register_hook(lambda g: g * scale)


class _ScaleGrad(torch.autograd.Function):
    """z as it is, forward; the gradient that reaches it times ``scale``, backward. DReG's
    reweighting (_dreg_reweight's hook) as a function, which torch.compile traces into its
    forward and backward graphs (a hook on a tensor inside a compiled graph it does not apply)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def dreg_from_noise(model, x: torch.Tensor, y: torch.Tensor | None, eps: torch.Tensor, u: torch.Tensor | None,
                    beta: float | torch.Tensor, m: int, q: Distribution | None = None) -> IwaeParts:
    """iwae with dreg at the samples z of q(z|x) whose standard-normal noise is eps (k, B, D),
    with the backward pass through m of each example's k samples (m ≥ k: all of them). Plain
    tensor code, which `--compile` compiles whole, forward and backward; iwae calls it for
    grad_samples. u (B, 1): the uniform offsets of the draw of the m samples (None: drawn here).
    q: q(z|x), if the caller has it; else it is encoded here.

    The gradient of L_k is Σ_i w̃_i ∇ log w_i (the encoder's share reweighted by DReG), and
    the normalised weights w̃ of a trained model are very uneven: a few samples carry nearly
    all of it. So all k log-weights of an example are computed without a graph (the forward
    pass, which the bound's value needs anyway), and the backward pass runs through m of them
    only, drawn without replacement with inclusion probability π_i = min(1, w̃_i/τ), τ set so
    that Σ_i π_i = m (every sample with w̃_i ≥ τ is certain to be in). Each drawn sample is
    weighted by w̃_i/π_i (Horvitz & Thompson 1952), so the gradient is unbiased: its
    expectation over the draw is the full gradient, for these z. The loss value is the full
    −L_k. Only the drawn samples are made again with a graph, from their noise, so everything
    that needs a backward pass (sampling, q(z2|z1) of a two-layer q, the decoder) runs on m
    samples an example, not k. With m ≥ k every sample is made again (w̃_i/π_i = w̃_i), so
    the forward pass runs twice; at k = 1 there is no weight to find first, and it runs once.
    q must be a diagonal Gaussian or a GaussianChain of them. Unlike iwae, this thins the
    backward pass even when no graph reaches z (an encoder with every parameter frozen); the
    decoder's gradient is then unbiased, not exact.
    """
    k = eps.shape[0]
    q = encode(model, x, y) if q is None else q
    if k == 1:  # w̃ = 1: the sample's gradient as it is, "sticking the landing"
        log_px_z, log_ratio = dreg_terms(model, x, y, from_noise(q, eps), q)
        return IwaeParts(-log_px_z[0], -log_ratio[0], -(log_px_z + beta * log_ratio)[0])
    with torch.no_grad():
        log_px_z, log_ratio = _terms(model, x, y, q, from_noise(q, eps))  # (k, B) each, no graph
    log_w = log_px_z + beta * log_ratio
    w = torch.softmax(log_w, dim=0)
    if m < k:
        picked, ht = horvitz_thompson_draw(w, m, u)  # (m, B) each
        eps, w_drawn = eps.gather(0, picked.unsqueeze(-1).expand(-1, -1, eps.shape[-1])), w.gather(0, picked)
    else:
        ht = w_drawn = w
    z = _ScaleGrad.apply(from_noise(q, eps), ((1 - beta) + beta * w_drawn).unsqueeze(-1))  # (m, B, D), with a graph
    lp, lr = dreg_terms(model, x, y, z, q)
    surrogate = -(ht * (lp + beta * lr)).sum(0)  # (B,)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return IwaeParts(-log_px_z.mean(0), -log_ratio.mean(0), -bound + (surrogate - surrogate.detach()))


def _terms(model, x: torch.Tensor, y: torch.Tensor | None, q: Distribution,
           z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) and log p(z) − log q(z|x) at z (k, B, D), each (k, B), with q as it is (its parameters live)."""
    return decode(model, z, y).log_prob(x), model.prior().log_prob(z) - q.log_prob(z)


def horvitz_thompson_draw(w: torch.Tensor, m: int, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of w (k, B), weights ≥ 0: m distinct row indices, row i drawn with
    probability π_i = min(1, w_i/τ), where τ (one per column) makes Σ_i π_i = m; and each drawn
    row's w_i/π_i. Both (m, B). u (B, 1): the draw's uniform offsets in [0, 1) (None: drawn here).

    τ by water-filling: with a column sorted, its j largest weights are certain and the rest
    share the m − j other draws; j is the first count for which the (j+1)-th largest weight fits
    under τ_j = (Σ of the rest)/(m − j) (j = m − 1 always qualifies). The draw is systematic:
    one uniform offset u per column, and the points u, u + 1, …, u + m − 1 on the cumulative sum of π.
    π is computed from w + 1e-12 so that no π is 0: a column with fewer than m weights above
    zero (float32 weights of a trained model underflow) draws all of those and fills up with
    zero-weight rows, whose w/π is 0. The cumulative sum is rescaled to end at m exactly.
    """
    k, B = w.shape
    if m >= k:
        return torch.arange(k, device=w.device).unsqueeze(1).expand(k, B), w
    floored = w + 1e-12  # what π comes from: no π is 0
    s = floored.sort(dim=0, descending=True).values  # (k, B)
    rest = s.flip(0).cumsum(0).flip(0)[:m]  # Σ of all but the j largest, j < m, summed from the small end
    tau_j = rest / torch.arange(m, 0, -1, device=w.device, dtype=w.dtype).unsqueeze(1)
    tau = tau_j.gather(0, (s[:m] <= tau_j).int().argmax(0, keepdim=True))  # (1, B): the first j that fits
    pi = (floored / tau).clamp(max=1.0)
    edges = pi.T.cumsum(1)  # (B, k): rows contiguous for searchsorted, also when compiled
    edges = edges * (m / edges[:, -1:])  # ending at m
    u = torch.rand(B, 1, device=w.device, dtype=w.dtype) if u is None else u
    points = u + torch.arange(m, device=w.device, dtype=w.dtype)
    picked = torch.searchsorted(edges, points, right=True).clamp(max=k - 1).T  # (m, B)
    return picked, w.gather(0, picked) / pi.gather(0, picked)


class _LogQ(torch.nn.Module):
    """log q(z|x) as a module call, so that torch.func.functional_call can run it with other parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        return encode(self.model, x, y).log_prob(z)  # evaluated here: a chained q calls its networks lazily


def dreg_terms(model, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor,
               q: Distribution | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z) and log p(z) − log q(z|x), each (k, B), with q's parameters held fixed in log q.
    q: q(z|x) if the caller has it (its parameters are detached here), else x is encoded again.

    DReG's share of iwae."""
    log_px_z = decode(model, z, y).log_prob(x)
    return log_px_z, model.prior().log_prob(z) - _log_q_params_fixed(model, x, y, z, q)


def _log_q_params_fixed(model, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor,
                        q: Distribution | None = None) -> torch.Tensor:
    """log q(z|x) with every parameter detached: its gradient reaches the encoder only through z.

    A diagonal Gaussian q is evaluated at its detached loc and scale, and a GaussianChain at
    its fixed() form (q(z2|z1)'s network rerun with detached weights, z1 live): plain tensor
    code, which torch.compile traces in one graph. Any other q goes through
    torch.func.functional_call with detached copies of all parameters.
    """
    if q is None:
        with torch.no_grad():  # x -> q's parameters: nothing there may get a gradient
            q = encode(model, x, y)
    fixed = q.fixed() if isinstance(q, GaussianChain) else detached_normal(q)
    return fixed.log_prob(z) if fixed is not None else _log_q_functional(model, x, y, z)


def _log_q_functional(model, x: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """_log_q_params_fixed for any q: the model run with detached copies of all its parameters."""
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    # x detached too: were x a leaf that needs a gradient, the score term would reach it here.
    return torch.func.functional_call(_LogQ(model), params, (x.detach(), y, z))


def norm_penalty(model, x: torch.Tensor, lam: float = 1.0, y: torch.Tensor | None = None) -> ElboParts:
    """The poor man's VAE loss (vaekit.models.poorman): ‖x − x̂‖² + λ·‖z‖, with z = f(x) + ε.

    `distortion` is the summed squared error and `rate` the noisy code's Euclidean norm, neither
    in nats: up to constants the loss is the −ELBO of a prior ∝ exp(−λ‖z‖) and a decoder
    N(x̂, ½I), not of the model sampling uses (vaekit.models.poorman). y: the labels, for a
    conditional model.
    """
    z = encode(model, x, y).rsample()  # (B, D)
    x_hat = decode(model, z, y).mean
    distortion = (x - x_hat).pow(2).flatten(1).sum(-1)
    rate = z.norm(dim=-1)
    return ElboParts(distortion, rate, distortion + lam * rate)
