"""The two-layer model's log p̂(x) (evaluate.log_px, q as proposal) against brute-force quadrature.

A tiny TwoLayerVAE with one-dimensional z1 and z2 has
    p(z2) = N(0, 1),  p(z1|z2) = N(μ(z2), σ²(z2)),  p(x|z1) = Π_j Bernoulli(x_j; sigmoid(l_j(z1))),
with [μ, log σ²] = p_z1(z2) and l = decoder(z1), so
    p(x) = ∫∫ p(x|z1) p(z1|z2) p(z2) dz1 dz2 = E[p(x | μ(t2) + σ(t2)·t1)],  t1, t2 ~ N(0, 1),
a smooth integrand with Gaussian tails, which the trapezoidal rule on an n-point grid over
[−9, 9] per axis integrates to machine precision (float64, from the model's networks alone:
no q(z|x), no vaekit distribution, no vaekit estimator).

log_px with K samples is the log of a mean of K importance weights; R seeded runs of K each
pool into one estimate with K·R samples whose standard error the spread across runs gives.
The two must agree within 5 standard errors; a wrong answer (the ELBO, the quadrature with a
wrong prior) must not.
"""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn.functional import softplus

from vaekit.config import ModelConfig
from vaekit.evaluate import log_px
from vaekit.models import build
from vaekit.objectives import elbo

D_X, N_GRID, K, RUNS = 6, 201, 25_000, 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds overhead, and much of it on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model():
    cfg = ModelConfig(arch="mlp2", hidden=(8,), latent1_dim=1, hidden2=(4,), latent_dim=1,
                      activation="tanh", likelihood="bernoulli", input_shape=(D_X,))
    model = build(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.decoder[::2]:  # a sharp p(x|z1): the posterior is far from q
            layer.weight.mul_(3)
            layer.bias.normal_(0, 1, generator=g)
        for layer in model.p_z1[::2]:  # p(z1|z2) moves with z2
            layer.weight.mul_(2)
        model.p_z1[-1].bias[1] = math.log(0.5**2)
        model.q_z1[-1].bias[1] = math.log(1.5**2)  # q wide enough for finite-variance weights
        model.q_z2[-1].bias[1] = math.log(1.5**2)
    return model


def all_images():
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=D_X)))


def some_images():
    return all_images()[torch.randperm(2**D_X, generator=torch.Generator().manual_seed(2))[:8]]


def brute_log_px(model, x, n=N_GRID, prior="model"):
    """log p(x) on an n×n grid, float64; prior "standard" or "log_var_as_log_std" is a wrong one."""
    net = copy.deepcopy(model).double()
    t = torch.linspace(-9, 9, n, dtype=torch.float64)
    log_w = math.log(t[1] - t[0]) - 0.5 * t**2 - 0.5 * math.log(2 * math.pi)
    with torch.no_grad():
        if prior == "standard":
            z1, log_w = t[None], log_w[None]
        else:
            mu, log_var = net.p_z1(t[:, None]).unbind(-1)
            std = (0.5 * log_var if prior == "model" else log_var).exp()
            z1, log_w = mu[:, None] + std[:, None] * t, log_w[:, None] + log_w
        logits = net.decoder(z1.reshape(-1, 1))
        log_lik = x.double() @ logits.T - softplus(logits).sum(-1)
        return torch.logsumexp(log_lik + log_w.reshape(-1), dim=-1)


@pytest.fixture(scope="module")
def case():
    model, x = tiny_model(), some_images()
    runs = torch.stack([log_px(model, x, K, seed=r) for r in range(RUNS)]).double()
    est = torch.logsumexp(runs, 0) - math.log(RUNS)
    se = (runs - est).exp().std(0) / math.sqrt(RUNS)
    return SimpleNamespace(model=model, x=x, est=est, tol=5 * se, exact=brute_log_px(model, x))


def test_quadrature_is_converged_and_normalised(case):
    torch.testing.assert_close(brute_log_px(case.model, case.x, n=151), case.exact, atol=1e-10, rtol=0)
    assert torch.logsumexp(brute_log_px(case.model, all_images()), 0).item() == pytest.approx(0, abs=1e-9)


def test_log_px_agrees_with_brute_force(case):
    assert case.tol.max() < 0.05, case.tol
    assert ((case.est - case.exact).abs() < case.tol).all(), (case.est - case.exact, case.tol)


def test_wrong_answers_fall_outside_the_tolerance(case):
    with torch.no_grad():
        wrong = {"elbo": elbo(case.model, case.x).elbo.double()}
    for prior in ("standard", "log_var_as_log_std"):
        wrong[prior] = brute_log_px(case.model, case.x, prior=prior)
    for name, value in wrong.items():
        assert ((value - case.est).abs() > case.tol).any(), (name, value - case.est, case.tol)
