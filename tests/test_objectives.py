"""The ELBO and IWAE bound against independent references."""

import copy
import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

from vaekit.config import ModelConfig
from vaekit.errors import ConfigError
from vaekit.models import build
from vaekit.objectives import elbo, iwae, iwae_bound, log_weights


def tiny(likelihood="bernoulli", **kw):
    return build(ModelConfig(latent_dim=3, hidden=(16,), input_shape=(1, 4, 5), likelihood=likelihood, **kw))


def test_kl_matches_appendix_b_formula_and_monte_carlo():
    torch.manual_seed(1)
    model = tiny()
    x = torch.rand(6, 1, 4, 5).bernoulli()
    q = model.encode(x)
    mu, var = q.mean, q.variance
    parts = elbo(model, x)
    # Kingma & Welling 2013, Appendix B: KL = -1/2 Σ (1 + log σ² − μ² − σ²)
    analytic = -0.5 * (1 + var.log() - mu**2 - var).sum(-1)
    torch.testing.assert_close(parts.rate, analytic, rtol=1e-5, atol=1e-5)
    # and a Monte Carlo estimate E_q[log q − log p] from log-densities alone
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z).sum(-1)).mean(0)
    torch.testing.assert_close(parts.rate, mc, rtol=0.02, atol=0.02)


def test_kl_on_random_parameters_against_distributions():
    torch.manual_seed(2)
    mu, log_var = torch.randn(50, 8) * 2, torch.randn(50, 8)
    q = Independent(Normal(mu, (0.5 * log_var).exp()), 1)

    class Fixed(torch.nn.Module):  # encoder returns the random q; decoder irrelevant
        latent_dim = 8
        def encode(self, x): return q
        def decode(self, z): return Independent(Bernoulli(logits=torch.zeros(*z.shape[:-1], 3)), 1)
        def prior(self): return Independent(Normal(torch.zeros(8), torch.ones(8)), 1)

    rate = elbo(Fixed(), torch.zeros(50, 3)).rate
    expected = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(-1)
    torch.testing.assert_close(rate, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_distortion_is_minus_log_likelihood(likelihood):
    torch.manual_seed(3)
    model = tiny(likelihood, sigma=0.3)
    x = torch.rand(5, 1, 4, 5).bernoulli()
    torch.manual_seed(4)
    parts = elbo(model, x)
    torch.manual_seed(4)
    z = model.encode(x).rsample()
    out = model.decoder(z).view(5, 1, 4, 5)
    if likelihood == "bernoulli":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").sum((1, 2, 3))
    else:  # Gaussian with fixed σ: MSE/(2σ²) + D·log(σ√(2π))
        expected = ((x - out) ** 2).sum((1, 2, 3)) / (2 * 0.3**2) + 20 * math.log(0.3 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(parts.distortion, expected, rtol=1e-5, atol=1e-4)


def test_beta_weights_only_the_rate():
    model = tiny()
    x = torch.rand(4, 1, 4, 5).bernoulli()
    torch.manual_seed(0)
    p1 = elbo(model, x, beta=1.0)
    torch.manual_seed(0)
    p4 = elbo(model, x, beta=4.0)
    torch.testing.assert_close(p4.loss, p1.distortion + 4 * p1.rate)
    torch.testing.assert_close(p1.loss, -p1.elbo)


def test_iwae_k1_equals_single_sample_log_weight_and_bounds_are_ordered():
    torch.manual_seed(5)
    model = tiny()
    x = torch.rand(64, 1, 4, 5).bernoulli()
    torch.manual_seed(6)
    l1 = iwae_bound(model, x, 1)
    torch.manual_seed(6)
    q = model.encode(x)
    z = q.rsample((1,))
    torch.testing.assert_close(l1, log_weights(model, x, q, z)[0])
    # On average L_1 <= L_10 <= L_100 (Burda et al., Theorem 1); average over many draws.
    with torch.no_grad():
        means = [torch.stack([iwae_bound(model, x, k).mean() for _ in range(20)]).mean() for k in (1, 10, 100)]
    assert means[0] < means[1] < means[2]


def test_iwae_beta_weights_the_log_ratio_inside_each_weight():
    torch.manual_seed(3)
    model = tiny()
    x = torch.rand(8, 1, 4, 5).bernoulli()
    torch.manual_seed(0)
    plain = iwae(model, x, 7)
    torch.manual_seed(0)
    half = iwae(model, x, 7, beta=0.5)
    torch.manual_seed(0)
    q = model.encode(x)
    z = q.rsample((7,))
    log_lik = model.decode(z).log_prob(x)
    log_ratio = model.prior().log_prob(z) - q.log_prob(z)
    expected = -(torch.logsumexp(log_lik + 0.5 * log_ratio, 0) - math.log(7))
    torch.testing.assert_close(half.loss, expected)
    torch.testing.assert_close(plain.loss, -(torch.logsumexp(log_lik + log_ratio, 0) - math.log(7)))
    torch.testing.assert_close(half.distortion, plain.distortion)  # the reported parts are unweighted
    torch.testing.assert_close(half.rate, plain.rate)
    assert (half.loss != plain.loss).all()
    torch.manual_seed(0)  # k = 1: the ELBO's distortion + β·(sampled) rate
    one = iwae(model, x, 1, beta=0.25)
    torch.testing.assert_close(one.loss, one.distortion + 0.25 * one.rate)


def test_gaussian_learned_sigma_distortion_and_its_gradient():
    """A σ per pixel: −log N(x; μ, σ²) = Σ_j (x_j − μ_j)²/(2σ_j²) + log σ_j + ½ log 2π, and its
    derivative in log σ_j is 1 − (x_j − μ_j)²/σ_j², which is what trains σ."""
    torch.manual_seed(8)
    model = tiny("gaussian", learn_sigma=True, sigma=0.5)
    log_sigma = model.likelihood.log_sigma
    assert any(p is log_sigma for p in model.parameters())
    with torch.no_grad():
        log_sigma.copy_(torch.randn(1, 4, 5) * 0.5)
    x = torch.rand(8, 1, 4, 5)
    torch.manual_seed(9)
    parts = elbo(model, x)
    torch.manual_seed(9)
    mu = model.decoder(model.encode(x).rsample()).view(8, 1, 4, 5).detach()
    sq = (x - mu) ** 2 / (2 * log_sigma.detach()).exp()
    expected = (sq / 2 + log_sigma.detach() + 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))
    torch.testing.assert_close(parts.distortion, expected, rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad(parts.distortion.sum(), log_sigma)
    torch.testing.assert_close(grad, (1 - sq).sum(0), rtol=1e-5, atol=1e-4)


def test_a_learned_sigma_is_held_at_its_floor():
    """Below sigma_min σ stays at the floor, with no gradient pushing it further; above, it is σ."""
    model = tiny("gaussian", learn_sigma=True, sigma=0.5, sigma_min=0.01)
    log_sigma = model.likelihood.log_sigma
    with torch.no_grad():
        log_sigma.fill_(math.log(0.2))
        log_sigma[0, 0, :2] = -20.0
    x = torch.rand(8, 1, 4, 5)
    scale = model.decode(model.encode(x).rsample()).base_dist.scale
    torch.testing.assert_close(scale[0, 0, 0, :2], torch.full((2,), 0.01))
    torch.testing.assert_close(scale[0, 0, 0, 2:], torch.full((3,), 0.2))
    elbo(model, x).loss.sum().backward()
    assert (log_sigma.grad[0, 0, :2] == 0).all() and (log_sigma.grad[0, 0, 2:] != 0).all()
    with pytest.raises(ConfigError, match="sigma_min"):
        tiny("gaussian", learn_sigma=True, sigma=0.5, sigma_min=0.6)


def test_free_bits_floor_each_dimension_in_the_loss_only():
    torch.manual_seed(7)
    model = tiny()
    x = torch.rand(6, 1, 4, 5).bernoulli()
    floor = 0.4
    torch.manual_seed(0)
    plain = elbo(model, x)
    torch.manual_seed(0)
    fb = elbo(model, x, free_bits=floor)
    torch.testing.assert_close(fb.rate, plain.rate)  # the reported KL is the true KL
    q = model.encode(x)
    per_dim = 0.5 * (q.mean**2 + q.variance - 1 - q.variance.log())  # (B, D), Appendix B per dimension
    assert (per_dim < floor).any(), "the test needs some dimensions under the floor"
    expected = plain.distortion + torch.maximum(per_dim, torch.tensor(floor)).sum(-1)
    torch.testing.assert_close(fb.loss, expected, rtol=1e-5, atol=1e-4)
    assert (fb.loss - fb.distortion >= floor * model.latent_dim - 1e-5).all()


def test_beta_zero_is_the_reconstruction_alone():
    model = tiny()
    x = torch.rand(5, 1, 4, 5).bernoulli()
    parts = elbo(model, x, beta=0.0)
    assert (parts.rate > 0).all()
    assert torch.equal(parts.loss, parts.distortion)


@pytest.mark.parametrize("arch", ["mlp", "mlp2"])
def test_elbo_with_k_samples_averages_the_single_sample_terms(arch):
    """k > 1 (the paper's "VAE, k samples"): the mean of the k one-sample reconstruction terms, same KL."""
    extra = {"latent1_dim": 2, "hidden2": (8,), "activation": "tanh"} if arch == "mlp2" else {}
    model = tiny(arch=arch, **extra)
    x = torch.rand(6, 1, 4, 5).round()
    torch.manual_seed(1)
    parts = elbo(model, x, k=4)
    torch.manual_seed(1)
    q = model.encode(x)
    z = q.rsample((4,))  # the same draws
    torch.testing.assert_close(parts.distortion, -model.decode(z).log_prob(x).mean(0))
    if arch == "mlp":  # closed-form KL: exactly the one-sample ELBO's
        torch.testing.assert_close(parts.rate, elbo(model, x).rate)
    else:  # sampled KL, averaged over the same k draws
        torch.testing.assert_close(parts.rate, (q.log_prob(z) - model.prior().log_prob(z)).mean(0))
    assert parts.distortion.shape == parts.rate.shape == (6,)
    # the estimate's spread over draws shrinks with k: same expectation, less noise
    with torch.no_grad():
        one = torch.stack([elbo(model, x).elbo for _ in range(200)])
        many = torch.stack([elbo(model, x, k=16).elbo for _ in range(200)])
    torch.testing.assert_close(one.mean(0), many.mean(0), atol=3 * float(one.std(0).max()) / 200 ** 0.5 + 1e-3,
                               rtol=0)
    assert (many.std(0) < one.std(0)).all()


def test_written_out_normal_kl_matches_torch_distributions_for_any_two_gaussians():
    from torch.distributions import kl_divergence

    from vaekit.objectives import kl, kl_per_dim

    torch.manual_seed(4)
    q = Independent(Normal(torch.randn(30, 5) * 3, torch.rand(30, 5) * 2 + 0.05), 1)
    p = Independent(Normal(torch.randn(30, 5), torch.rand(30, 5) + 0.1), 1)
    torch.testing.assert_close(kl(q, p, q.sample()), kl_divergence(q, p))
    torch.testing.assert_close(kl_per_dim(q, p), kl_divergence(q.base_dist, p.base_dist))


def test_normal_kl_stays_finite_where_the_variance_ratio_underflows():
    from vaekit.objectives import normal_kl

    q, p = Normal(torch.tensor([0.0, 2.0]), torch.tensor([1e-25, 1e-25])), Normal(torch.zeros(2), torch.ones(2))
    # ½(σq²/σp² + μq² − 1 − log σq²/σp²) in float64: the σq² term is 1e-50, so it drops out.
    # (σq/σp)² is 0 in float32, and its log −inf: torch.distributions' kl_divergence returns inf here.
    expected = 0.5 * (torch.tensor([0.0, 4.0], dtype=torch.float64) - 1 - 2 * math.log(1e-25))
    torch.testing.assert_close(normal_kl(q, p).double(), expected, rtol=1e-6, atol=0)


DREG_ARCHS = {"mlp": {}, "mlp2": {"arch": "mlp2", "latent1_dim": 2, "hidden2": (8,), "activation": "tanh"}}


def _grads(model, x, k, beta, dreg, seed):
    """Per-parameter gradients of the summed IWAE loss for one draw of the k samples."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    parts = iwae(model, x, k, beta=beta, dreg=dreg)
    parts.loss.sum().backward()
    return parts.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _is_encoder(name: str) -> bool:
    return name.startswith(("encoder", "q_"))


@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_dreg_leaves_the_loss_and_the_decoder_gradient_as_they_are(arch):
    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(5, 1, 4, 5).bernoulli()
    loss, plain = _grads(model, x, 6, 0.7, dreg=False, seed=1)
    loss_d, dreg = _grads(model, x, 6, 0.7, dreg=True, seed=1)
    torch.testing.assert_close(loss_d, loss)
    for name in plain:
        if _is_encoder(name):
            assert not torch.allclose(dreg[name], plain[name]), name  # the estimator did change
        else:  # the decoder and prior networks (p(z1|z2) too) get the plain IWAE gradient
            torch.testing.assert_close(dreg[name], plain[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_dregs_fixed_log_q_matches_the_functional_call_one(arch):
    """log q with the parameters fixed, built from detached distribution parameters (and, for
    q(z2|z1), the network rerun with detached weights), against running the whole model through
    torch.func.functional_call with detached parameters: same values, same gradient to z, and
    no gradient for any parameter."""
    from vaekit.objectives import _log_q_functional, _log_q_params_fixed

    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(4, 1, 4, 5).bernoulli()
    z = model.encode(x).rsample((3,))
    got = {}
    for name, fn in [("fixed", _log_q_params_fixed), ("functional", _log_q_functional)]:
        zz = z.detach().requires_grad_()
        value = fn(model, x, None, zz)
        value.sum().backward()
        assert all(p.grad is None for p in model.parameters()), name
        got[name] = (value.detach(), zz.grad)
    torch.testing.assert_close(got["fixed"], got["functional"])
    assert got["fixed"][1].abs().sum() > 0


def test_forward_params_detached_is_the_network_without_parameter_gradients():
    from vaekit.models.common import forward_params_detached, mlp

    torch.manual_seed(0)
    net = mlp([3, 5, 4], "softplus")
    h = torch.randn(6, 3, requires_grad=True)
    out = forward_params_detached(net, h)
    torch.testing.assert_close(out, net(h))
    out.sum().backward()
    assert h.grad is not None and all(p.grad is None for p in net.parameters())
    with pytest.raises(ConfigError, match="Linear layers and parameter-free"):
        forward_params_detached(torch.nn.Sequential(torch.nn.LayerNorm(3)), h)


@pytest.mark.parametrize("k", [7, 1])  # k = 1: "sticking the landing" (Roeder et al. 2017)
@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_dreg_encoder_gradient_is_tucker_et_al_eq_5_draw_by_draw(arch, beta, k):
    """Each draw against the estimator written out: −Σ_i c_i log w_i with log q from a frozen copy
    of the model (parameters fixed, z live: for two layers z1 enters q(z2|z1) live) and
    c_i = w̃_i·((1 − β) + β·w̃_i), i.e. w̃_i² at β = 1, the score term moved onto the samples."""
    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = torch.rand(4, 1, 4, 5).bernoulli()
    for seed in range(3):
        _, got = _grads(model, x, k, beta, dreg=True, seed=seed)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        z = model.encode(x).rsample((k,))
        q = frozen.encode(x)
        if arch == "mlp":
            log_q = q.log_prob(z)
        else:  # q(z1|x) q(z2|z1) from its two parts, not through GaussianChain.log_prob
            z1, z2 = z[..., : frozen.cfg.latent1_dim], z[..., frozen.cfg.latent1_dim :]
            log_q = q.first.log_prob(z1) + q.second(z1).log_prob(z2)
        log_w = model.decode(z).log_prob(x) + beta * (model.prior().log_prob(z) - log_q)
        w = torch.softmax(log_w.detach(), 0)
        (-(w * ((1 - beta) + beta * w) * log_w).sum()).backward()
        for name, p in model.named_parameters():
            if _is_encoder(name):
                torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_dreg_encoder_gradient_has_the_plain_expectation_and_less_variance(arch, beta):
    """Monte Carlo over 300 draws of both estimators: means agree within their standard errors.

    At k = 10 the doubly reparameterized estimator is much less noisy (Tucker et al. 2019); with
    β < 1 (KL warm-up) each sample's factor is (1 − β) + β·w̃_i and the mean must still agree.
    """
    torch.manual_seed(2)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(3, 1, 4, 5).bernoulli()
    draws = {False: [], True: []}
    for dreg in draws:
        for s in range(300):
            g = _grads(model, x, 10, beta, dreg, seed=1000 + s)[1]
            draws[dreg].append(torch.cat([g[n].flatten() for n in g if _is_encoder(n)]))
    plain, dreg = torch.stack(draws[False]).double(), torch.stack(draws[True]).double()
    se = (plain.var(0) / len(plain) + dreg.var(0) / len(dreg)).sqrt()
    z = (plain.mean(0) - dreg.mean(0)) / se.clamp_min(1e-12)
    assert z.pow(2).mean() < 1.6 and z.abs().max() < 5, (z.pow(2).mean(), z.abs().max())
    assert dreg.var(0).sum() < 0.5 * plain.var(0).sum()


def test_dreg_needs_the_iwae_objective():
    from vaekit.config import TrainConfig
    from vaekit.errors import ConfigError

    TrainConfig(objective="iwae", k=5, dreg=True).check()
    with pytest.raises(ConfigError, match="dreg.*IWAE"):
        TrainConfig(objective="elbo", dreg=True).check()


def test_grad_samples_needs_dreg_and_a_count():
    from vaekit.config import TrainConfig

    TrainConfig(objective="iwae", k=50, dreg=True, grad_samples=4).check()
    with pytest.raises(ConfigError, match="grad_samples.*dreg"):
        TrainConfig(objective="iwae", k=50, grad_samples=4).check()
    with pytest.raises(ConfigError, match="grad_samples must be non-negative"):
        TrainConfig(objective="iwae", k=50, dreg=True, grad_samples=-1).check()


def test_iwae_with_grad_samples_takes_the_thinned_backward_pass_only_below_k():
    """grad_samples < k: the thinned pass (a different gradient, the same loss); ≥ k, or no graph: iwae as it is."""
    torch.manual_seed(0)
    model = tiny()
    x = torch.rand(3, 1, 4, 5).bernoulli()

    def run(**kw):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        parts = iwae(model, x, 6, dreg=True, **kw)
        parts.loss.sum().backward()
        return parts.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    full, sparse, same = run(), run(grad_samples=2), run(grad_samples=6)
    torch.testing.assert_close(sparse[0], full[0])
    assert not torch.allclose(sparse[1], full[1])
    assert torch.equal(same[0], full[0]) and torch.equal(same[1], full[1])
    with torch.no_grad():  # evaluation: no graph, nothing to thin
        torch.manual_seed(1)
        torch.testing.assert_close(iwae(model, x, 6, dreg=True, grad_samples=2).loss, full[0])


def test_horvitz_thompson_draw_takes_m_distinct_rows_each_with_its_probability():
    """Inclusion probabilities π = min(1, w/τ) with Σ π = m in each column (τ found here by
    bisection), checked by counting 4000 draws; the returned weights are w/π, so Σ over a draw
    of (w/π)·f is unbiased for Σ w·f."""
    from vaekit.objectives import horvitz_thompson_draw

    torch.manual_seed(0)
    w = torch.softmax(torch.randn(40, 3, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.1]), 0)
    m, draws = 8, 4000
    pi = torch.empty_like(w)
    for b in range(3):
        lo, hi = 0.0, 1.0
        for _ in range(200):
            tau = (lo + hi) / 2
            lo, hi = (tau, hi) if (w[:, b] / tau).clamp(max=1).sum() > m else (lo, tau)
        pi[:, b] = (w[:, b] / tau).clamp(max=1)
    assert (pi[:, 0] == 1).sum() >= 1 and (pi[:, 2] < 1).all()  # some samples certain, in an uneven column
    counts = torch.zeros_like(w)
    for _ in range(draws):
        idx, weight = horvitz_thompson_draw(w, m)
        assert idx.shape == (m, 3) and all(len(idx[:, b].unique()) == m for b in range(3))
        torch.testing.assert_close(weight, w.gather(0, idx) / pi.gather(0, idx))
        counts.scatter_add_(0, idx, torch.ones_like(weight))
    se = (pi * (1 - pi) / draws).sqrt().clamp_min(1e-3)
    assert ((counts / draws - pi).abs() / se).max() < 4.5
    all_idx, all_w = horvitz_thompson_draw(w, 40)  # m = k: every row, weighted as it is
    assert torch.equal(all_idx[:, 1], torch.arange(40)) and torch.equal(all_w, w)
    # Fewer weights above zero than draws (float32 weights underflow): those, and zero-weight fill.
    few = torch.zeros(40, 2)
    few[[3, 7], 0] = torch.tensor([0.75, 0.25])
    few[5, 1] = 1.0
    for _ in range(50):
        idx, weight = horvitz_thompson_draw(few, m)
        assert torch.isfinite(weight).all() and all(len(idx[:, b].unique()) == m for b in range(2))
        assert {3, 7} <= set(idx[:, 0].tolist()) and 5 in idx[:, 1].tolist()
        assert torch.equal(weight.sum(0), torch.ones(2))  # the nonzero ones at their own weight, the fill at 0


@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_samples_from_noise_are_rsamples_and_a_subset_of_the_noise_gives_that_subset(arch):
    """draw_noise + from_noise give, for one seed, what torch.distributions gives part by part
    (q(z1|x), then q(z2|z1); for the prior p(z2), then p(z1|z2)); a subset of the noise gives
    the same samples with the same gradients as picking them from those."""
    from vaekit.distributions import GaussianChain, draw_noise, from_noise, noise_drawer

    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(4, 1, 4, 5).bernoulli()
    q = model.encode(x)
    k = 6
    torch.manual_seed(1)
    eps = draw_noise(q, (k,))
    torch.manual_seed(1)  # a drawer made from another batch's q draws the same for this one
    assert torch.equal(noise_drawer(model.encode(x[:1]))((k, 4)), eps)
    z = from_noise(q, eps)
    torch.manual_seed(1)
    if isinstance(q, GaussianChain):
        a = q.first.rsample((k,))
        reference = torch.cat([a, q.second(a).rsample()], -1)
    else:
        reference = q.base_dist.rsample((k,))
    assert z.shape == (k, 4, model.latent_dim) and torch.equal(z, reference)

    picked = torch.tensor([[5, 0, 2, 2], [1, 3, 0, 4]]).unsqueeze(-1)  # (2, B, 1): two samples of each example
    coef = torch.randn(2, 4, model.latent_dim)  # a loss that weighs every coordinate differently

    def grads(sample):
        model.zero_grad(set_to_none=True)
        (coef * sample).sum().backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sub = from_noise(q, eps.gather(0, picked.expand(-1, -1, eps.shape[-1])))
    picked_ref = reference.gather(0, picked.expand(-1, -1, reference.shape[-1]))
    torch.testing.assert_close(sub, picked_ref)
    got, want = grads(sub), grads(picked_ref)
    assert got.keys() == want.keys() == {n for n, _ in model.named_parameters() if n.startswith(("encoder", "q_z"))}
    for name in want:
        torch.testing.assert_close(got[name], want[name])

    prior = model.prior()
    if isinstance(prior, GaussianChain):  # z = [z1, z2], z2 drawn first
        torch.manual_seed(2)
        drawn = prior.sample((k,))
        torch.manual_seed(2)
        z2 = prior.first.sample((k,))
        torch.testing.assert_close(drawn, torch.cat([prior.second(z2).sample(), z2], -1))
    with pytest.raises(ConfigError, match="diagonal Gaussian"):
        draw_noise(Independent(Bernoulli(logits=torch.zeros(3, 2)), 1))


def test_grad_samples_with_a_frozen_encoder_trains_the_decoder_exactly():
    """With q's parameters frozen no graph reaches z, so DReG and its thinning do not apply: the
    decoder gets the plain IWAE gradient over all k samples, as without grad_samples."""
    torch.manual_seed(0)
    model = tiny()
    x = torch.rand(3, 1, 4, 5).bernoulli()
    for p in model.encoder.parameters():
        p.requires_grad_(False)

    def run(**kw):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        parts = iwae(model, x, 6, dreg=True, **kw)
        parts.loss.sum().backward()
        return parts.loss.detach(), [p.grad for p in model.decoder.parameters()]

    (loss, grads), (loss_thin, grads_thin) = run(), run(grad_samples=2)
    assert torch.equal(loss, loss_thin)
    for g, g_thin in zip(grads, grads_thin):
        assert g is not None and torch.equal(g, g_thin)


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_thinned_dreg_keeps_the_loss_and_the_expected_gradient(arch, beta):
    """grad_samples = 2 of k = 8 (a quarter of the backward pass): for the same draw of z, the
    loss is the full −L_k and the gradient averaged over 600 draws of the subset is DReG's full
    gradient, within Monte Carlo error, for encoder and decoder alike."""
    from vaekit.distributions import draw_noise
    from vaekit.objectives import dreg_from_noise

    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(4, 1, 4, 5).bernoulli()
    k = 8

    def sparse(seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        q = model.encode(x)
        eps = draw_noise(q, (k,))  # the same z every time
        torch.manual_seed(seed)  # a new subset
        return dreg_from_noise(model, x, None, eps, None, beta, 2, q=q)

    # the full DReG gradient for this z, through iwae itself (same seed, so the same z)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    full = iwae(model, x, k, beta=beta, dreg=True)
    full.loss.sum().backward()
    g_full = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    draws = []
    for s in range(600):
        parts = sparse(1000 + s)
        if s == 0:
            torch.testing.assert_close(parts.loss, full.loss)
        parts.loss.sum().backward()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    g = torch.stack(draws)
    assert not torch.allclose(g[0], g_full)  # a single draw is not the full gradient
    se = (g.var(0) / len(g)).sqrt()
    z_score = (g.mean(0) - g_full) / (se + 1e-6 * g_full.abs().max())
    assert z_score.abs().max() < 5


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("arch", DREG_ARCHS)
def test_dreg_from_noise_with_every_sample_is_iwaes_dreg(arch, beta, k):
    """dreg_from_noise (what --compile trains with: DReG's reweighting as an autograd function,
    not a hook) with m = k: the loss and every gradient of iwae(dreg=True) for the same z, and
    the encoder's gradient is not plain IWAE's (at k = 1 it lacks the score term: sticking the landing)."""
    from vaekit.distributions import draw_noise
    from vaekit.objectives import dreg_from_noise

    torch.manual_seed(0)
    model = tiny(**DREG_ARCHS[arch])
    x = torch.rand(4, 1, 4, 5).bernoulli()

    def run(f):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        parts = f()
        parts.loss.sum().backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    hooked, g_hook = run(lambda: iwae(model, x, k, beta=beta, dreg=True))
    plain, g_plain = run(lambda: iwae(model, x, k, beta=beta))
    fused, g_fused = run(lambda: dreg_from_noise(model, x, None, draw_noise(model.encode(x), (k,)), None, beta, k))
    for got, want in zip(fused, hooked):
        torch.testing.assert_close(got, want)
    assert g_fused.keys() == g_hook.keys()
    for name in g_hook:
        torch.testing.assert_close(g_fused[name], g_hook[name], rtol=1e-5, atol=1e-6)
    encoder = [n for n in g_hook if n.startswith(("encoder", "q_z"))]
    assert encoder and all(not torch.allclose(g_plain[n], g_hook[n]) for n in encoder)


@pytest.mark.parametrize("m", [0, 2])
@pytest.mark.parametrize("arch", [*DREG_ARCHS, "conditional"])
def test_the_compiled_dreg_step_draws_and_computes_what_eager_iwae_does(arch, m, monkeypatch):
    """The step `--compile` trains with dreg (train.compiled_loss: the noise drawn outside the
    graph, then objectives.dreg_from_noise), run here with torch.compile as the identity: for
    one seed it draws the same random numbers as eager iwae(dreg=True) and gives its loss and
    gradients; bit for bit when thinned (the same code on the same numbers), to float rounding
    with every sample (eager scales the gradient by a hook there)."""
    from contextlib import nullcontext

    from vaekit import train
    from vaekit.config import TrainConfig

    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    torch.manual_seed(0)
    model = tiny(**({"n_classes": 3} if arch == "conditional" else DREG_ARCHS[arch]))
    x = torch.rand(4, 1, 4, 5).bernoulli()
    y = torch.tensor([0, 2, 1, 2]) if arch == "conditional" else None
    tc = TrainConfig(objective="iwae", k=6, dreg=True, grad_samples=m)
    fn = train.compiled_loss(model, x, y, tc, nullcontext())
    beta = torch.tensor(0.6)

    def run(loss):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        parts = loss()
        parts.loss.sum().backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters()}, torch.rand(3)

    got, g_got, next_got = run(lambda: fn(model, x, y, beta, tc))
    want, g_want, next_want = run(lambda: iwae(model, x, 6, y, beta=beta, dreg=True, grad_samples=m))
    assert torch.equal(next_got, next_want)  # as many random numbers drawn
    assert g_got.keys() == g_want.keys()
    for a, b in [*zip(got, want), *((g_got[n], g_want[n]) for n in g_want)]:
        if m:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_poor_mans_loss_is_squared_error_plus_lambda_times_the_noisy_codes_norm():
    from vaekit.config import TrainConfig
    from vaekit.objectives import norm_penalty
    from vaekit.train import loss_parts

    torch.manual_seed(0)
    model = build(ModelConfig(arch="poor-man", latent_dim=3, hidden=(16,), input_shape=(1, 4, 5),
                              likelihood="gaussian", sigma=0.1))
    x = torch.rand(6, 1, 4, 5)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        parts = norm_penalty(model, x, lam=0.25)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        f = model.encoder(x.flatten(1))  # the deterministic code
        z = f + torch.randn(6, 3)  # plus fixed unit noise, drawn as rsample draws it
        x_hat = model.decoder(z).view(6, 1, 4, 5)
    distortion = ((x - x_hat) ** 2).flatten(1).sum(1)
    rate = z.pow(2).sum(1).sqrt()  # the norm, not its square, and no KL
    torch.testing.assert_close(parts.distortion, distortion)
    torch.testing.assert_close(parts.rate, rate)
    torch.testing.assert_close(parts.loss, distortion + 0.25 * rate)
    # the training loop takes λ from train.beta
    tc = TrainConfig(objective="norm-penalty", beta=0.25)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.testing.assert_close(loss_parts(model, x, None, 1.0, tc).loss, parts.loss)


@pytest.mark.parametrize("k", [0, -2, 2.5, True])
def test_sample_counts_below_one_or_not_whole_are_named(k):
    model = build(ModelConfig(latent_dim=2, hidden=(4,), input_shape=(1, 3, 3)))
    x = torch.rand(2, 1, 3, 3).round()
    for objective in (lambda: elbo(model, x, k=k), lambda: iwae(model, x, k), lambda: iwae_bound(model, x, k)):
        with pytest.raises(ConfigError, match="samples of z per example"):
            objective()


def test_a_negative_kl_weight_is_named():
    model = build(ModelConfig(latent_dim=2, hidden=(4,), input_shape=(1, 3, 3)))
    x = torch.rand(2, 1, 3, 3).round()
    for objective in (lambda: elbo(model, x, beta=-1.0), lambda: iwae(model, x, 3, beta=-0.5)):
        with pytest.raises(ConfigError, match="beta"):
            objective()
    assert torch.isfinite(elbo(model, x, beta=0.0).loss).all()  # β = 0: a plain autoencoder's loss, allowed
