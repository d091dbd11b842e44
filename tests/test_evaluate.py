"""evaluate.py against exact math: a linear-Gaussian model has a closed-form log p(x).

Model: p(z) = N(0, I_D), p(x|z) = N(Wz + b, σ²I). Then
    p(x)     = N(x; b, WWᵀ + σ²I)
    p(z|x)   = N(μ_post, Σ_post),  Σ_post = (I + WᵀW/σ²)⁻¹,  μ_post = Σ_post Wᵀ(x − b)/σ².
With q = p(z|x) every importance weight equals p(x), so the estimate is exact for any k.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal, kl_divergence

from vaekit import evaluate as ev
from vaekit.config import ModelConfig
from vaekit.errors import ConfigError
from vaekit.models import build
from vaekit.generate import encode_mean
from vaekit.objectives import elbo, iwae, iwae_bound, log_weights

DT = torch.float64


class LinearGaussian(nn.Module):
    """encode/decode/prior like vaekit's models; encode returns the exact or a perturbed posterior.

    q = "full":      the exact posterior as a full-covariance MultivariateNormal;
    q = "diag":      the exact posterior as Independent(Normal) (exact only if W's columns are orthogonal);
    q = "perturbed": Independent(Normal) with the mean shifted by `shift` posterior std and the std × `inflate`.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float, q: str = "full",
                 shift: float = 0.5, inflate: float = 1.5):
        super().__init__()
        self.W = nn.Parameter(W.to(DT))  # (Dx, D)
        self.b = nn.Parameter(b.to(DT))  # (Dx,)
        self.sigma, self.q, self.shift, self.inflate = sigma, q, shift, inflate
        d = W.shape[1]
        with torch.no_grad():
            self.register_buffer("post_cov", torch.linalg.inv(torch.eye(d, dtype=DT) + self.W.T @ self.W / sigma**2))

    def encode(self, x):
        mu = (x - self.b) @ self.W / self.sigma**2 @ self.post_cov  # (B, D); post_cov is symmetric
        if self.q == "full":
            return MultivariateNormal(mu, covariance_matrix=self.post_cov)
        std = self.post_cov.diagonal().sqrt().expand_as(mu)
        if self.q == "perturbed":
            return Independent(Normal(mu + self.shift * std, self.inflate * std), 1)
        return Independent(Normal(mu, std), 1)

    def decode(self, z):
        return Independent(Normal(z @ self.W.T + self.b, torch.full_like(self.b, self.sigma)), 1)

    def prior(self):
        eye = torch.eye(self.W.shape[1], dtype=DT, device=self.W.device)
        if self.q == "full":  # torch has KL(MVN ‖ MVN) but not KL(MVN ‖ Independent)
            return MultivariateNormal(eye[0] * 0, covariance_matrix=eye)
        return Independent(Normal(eye[0] * 0, eye[0] * 0 + 1), 1)

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(len(self.b), dtype=DT, device=self.W.device)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def sample_x(self, n, generator=None):
        z = torch.randn(n, self.W.shape[1], dtype=DT, generator=generator)
        return self.decode(z).mean + self.sigma * torch.randn(n, len(self.b), dtype=DT, generator=generator)


def linear_gaussian(d_x=5, d=3, sigma=0.7, q="full", orthogonal=False, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_x, d, dtype=DT, generator=g)
    if orthogonal:  # orthogonal columns of different lengths: WᵀW diagonal, so p(z|x) is diagonal
        W = torch.linalg.qr(W).Q * torch.linspace(0.5, 2.0, d, dtype=DT)
    return LinearGaussian(W, torch.randn(d_x, dtype=DT, generator=g), sigma, q, **kw)


def small_vae(latent_dim=4, likelihood="bernoulli", seed=0, sigma=1.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(latent_dim=latent_dim, hidden=(32,), activation="tanh",
                      likelihood=likelihood, sigma=sigma, input_shape=(1, 6, 6))
    return build(cfg)


def binary_images(n, shape=(1, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


# ------------------------------------------------------------ exactness


@pytest.mark.parametrize("q, orthogonal", [("full", False), ("diag", True)])
@pytest.mark.parametrize("k", [1, 7, 5000])
def test_exact_posterior_gives_exact_log_px(q, orthogonal, k):
    model = linear_gaussian(q=q, orthogonal=orthogonal)
    x = model.sample_x(6, torch.Generator().manual_seed(1))
    est = ev.log_px(model, x, k, seed=0)
    assert est.shape == (6,)
    torch.testing.assert_close(est, model.exact_log_px(x).detach(), atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 4), extra=st.integers(0, 3), sigma=st.floats(0.1, 3.0),
       seed=st.integers(0, 2**16), k=st.integers(1, 20))
def test_exact_posterior_identity_random_models(d, extra, sigma, seed, k):
    model = linear_gaussian(d_x=d + extra, d=d, sigma=sigma, q="full", seed=seed)
    x = model.sample_x(3, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ev.log_px(model, x, k, seed=seed), model.exact_log_px(x).detach(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("dreg", [False, True])
@pytest.mark.parametrize("k", [1, 7])
def test_the_training_bound_is_exact_when_q_is_the_posterior(k, dreg):
    """With q = p(z|x) every log-weight is log p(x), so L_k (what iwae trains on) is exact for any k."""
    model = linear_gaussian(q="diag", orthogonal=True)
    x = model.sample_x(6, torch.Generator().manual_seed(3))
    exact = model.exact_log_px(x).detach()
    torch.manual_seed(0)
    torch.testing.assert_close(iwae_bound(model, x, k).detach(), exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(-iwae(model, x, k, dreg=dreg).loss.detach(), exact, atol=1e-9, rtol=0)


def test_the_elbo_is_log_px_less_the_kl_from_q_to_the_posterior():
    """E_q[ELBO] = log p(x) − KL(q(z|x) ‖ p(z|x)), both sides in closed form; the ELBO averaged over
    many samples of z meets it within a few standard errors."""
    model = linear_gaussian(q="perturbed", orthogonal=True, shift=0.7, inflate=1.4)
    x = model.sample_x(4, torch.Generator().manual_seed(4))
    q = model.encode(x)
    post = Independent(Normal(q.mean - 0.7 * q.stddev / 1.4, q.stddev / 1.4), 1)  # p(z|x): W's columns orthogonal
    expected = (model.exact_log_px(x) - kl_divergence(q, post)).detach()
    assert (kl_divergence(q, post) > 0.1).all()
    torch.manual_seed(0)
    draws = torch.stack([elbo(model, x, k=1000).elbo.detach() for _ in range(20)])  # 20 means of 1000
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - expected).abs() < 4 * se + 1e-9).all(), (mean - expected, se)
    assert (se < 0.05).all()


def test_error_shrinks_with_k_and_k5000_is_unbiased():
    model = linear_gaussian(q="perturbed", shift=0.5, inflate=1.5)
    x = model.sample_x(300, torch.Generator().manual_seed(2))
    exact = model.exact_log_px(x).detach()
    gaps = []  # exact − estimate: ≥ 0 in expectation (Jensen), shrinking with k
    for k in (1, 10, 100, 1000):
        gap = exact - ev.log_px(model, x, k, seed=k)
        gaps.append((gap.mean().item(), gap.std().item() / math.sqrt(len(gap))))
    for (g_small, se_small), (g_big, se_big) in zip(gaps, gaps[1:]):
        assert g_big < g_small + 3 * math.hypot(se_small, se_big), gaps
    assert gaps[0][0] > 10 * gaps[0][1] > 0  # k = 1 is clearly biased: the test has power
    gap = exact - ev.log_px(model, x, 5000, seed=5000)
    assert abs(gap.mean().item()) < 3 * gap.std().item() / math.sqrt(len(gap)) + 1e-6


def test_lk_non_decreasing_and_l1_matches_elbo():
    model = small_vae()
    x = binary_images(2000)
    means = []
    for k in (1, 4, 16, 64):
        lk = ev.log_px(model, x, k, seed=k)
        means.append((lk.mean().item(), lk.std().item() / math.sqrt(len(lk))))
    for (m_small, se_small), (m_big, se_big) in zip(means, means[1:]):
        assert m_big > m_small - 3 * math.hypot(se_small, se_big), means
    assert means[-1][0] > means[0][0] + 3 * math.hypot(means[0][1], means[-1][1]), means
    with torch.no_grad():
        e = elbo(model, x).elbo
    se = math.hypot(means[0][1], e.std().item() / math.sqrt(len(e)))
    assert abs(means[0][0] - e.mean().item()) < 4 * se, (means[0], e.mean().item(), se)


# ------------------------------------------------------------ fast path, chunks, seeds


@pytest.mark.parametrize("bf16", [False, True])
def test_fast_bernoulli_path_equals_generic_log_weights(bf16):
    model = small_vae()
    x = binary_images(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        q = model.encode(x)
        fast = ev._BinaryBernoulli(x)
        for n in (3, 7, 2):  # a larger chunk regrows the buffer; a smaller one reuses it
            z = q.sample((n,))
            lw = ev._log_weights(model, x, q, z, fast)
            generic = log_weights(model, x, q, z)
            assert lw.shape == (n, 5) and lw.dtype == torch.float32
            torch.testing.assert_close(lw, generic, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(ev._log_weights(model, x, q, z, None), generic)


def test_fast_bernoulli_survives_overflowing_logits():
    """e^y overflows for y > 88.7: the chunk is redone with logaddexp, never returned as -inf."""
    x = binary_images(3)
    logits = torch.randn(4, 3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 5
    logits[1, 0, 0, 0, :3] = torch.tensor([200.0, -200.0, 95.0])  # huge, in both directions
    logits[2, 1, 0, 2, 2] = -1e4 if x[1, 0, 2, 2] == 1 else 1e4  # confidently wrong: y = +1e4
    p_x = Independent(Bernoulli(logits=logits, validate_args=False), 3)
    got = ev._BinaryBernoulli(x)(p_x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, p_x.log_prob(x), atol=1e-4, rtol=1e-6)
    assert got[2, 1] < -1e4 + 100  # −softplus(1e4) ≈ −1e4, not −inf


def test_gaussian_proposal_draws_what_q_sample_draws():
    """The ε path: z bitwise equal to q.sample from the same RNG state; log p(z) − log q(z|x) as Normal has it."""
    model, x = small_vae(), binary_images(5)
    with torch.no_grad():
        q = model.encode(x)
    gauss = ev._GaussianProposal.of(q, model.prior())
    assert gauss is not None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        z_ref = q.sample((7,))
        torch.manual_seed(0)
        eps = gauss.eps((7,))
    z = gauss.z(eps)
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(gauss.log_ratio(eps, z), model.prior().log_prob(z) - q.log_prob(z),
                               atol=1e-5, rtol=1e-6)


def test_gaussian_proposal_only_for_a_diagonal_q_and_a_standard_normal_prior():
    model = small_vae()
    with torch.no_grad():
        q = model.encode(binary_images(2))
    assert ev._GaussianProposal.of(q, model.prior()) is not None
    shifted = Independent(Normal(torch.full((4,), 0.5), torch.ones(4)), 1)
    wide = Independent(Normal(torch.zeros(4), torch.full((4,), 2.0)), 1)
    other_d = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    for prior in (shifted, wide, other_d):
        assert ev._GaussianProposal.of(q, prior) is None
    full = linear_gaussian(q="full")  # MultivariateNormal q and prior: the generic path
    x = full.sample_x(2)
    assert ev._GaussianProposal.of(full.encode(x), full.prior()) is None


def test_onednn_fp32_matmuls_leave_log_px_unchanged():
    """bench/eval_speed.py times a second limit with fp32 matmuls on oneDNN (vaekit.train.onednn_fp32_matmuls):
    where that routing applies it must compute the same log p(x)."""
    from vaekit.train import _onednn_keeps_fp32, onednn_fp32_matmuls

    if not _onednn_keeps_fp32():
        pytest.skip("oneDNN would not keep fp32 matmuls in fp32 on this CPU, so nothing is routed")
    torch.manual_seed(0)
    model = build(ModelConfig(latent_dim=8, hidden=(64,), activation="relu", input_shape=(1, 12, 12)))
    x = binary_images(100, shape=(1, 12, 12))
    default = ev.log_px(model, x, 40, seed=0)
    with onednn_fp32_matmuls():
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the routing is on
        routed = ev.log_px(model, x, 40, seed=0)
    torch.testing.assert_close(routed, default, atol=1e-5, rtol=0)


def test_non_binary_x_takes_the_generic_path():
    model = small_vae()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 6, 6, generator=g)
    est = ev.log_px(model, x, 3, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.no_grad():
            q = model.encode(x)
            ref = torch.logsumexp(log_weights(model, x, q, q.sample((3,))), 0) - math.log(3)
    torch.testing.assert_close(est, ref)


@pytest.mark.parametrize("which, precision", [("mlp", "fp32"), ("mlp", "bf16"), ("linear", "fp32"),
                                              ("linear-full", "fp32")])
def test_chunking_does_not_change_the_result(which, precision):
    if which == "mlp":
        model, x = small_vae(), binary_images(5)
    else:  # "linear": q diagonal Gaussian (the ε path); "linear-full": q a MultivariateNormal (q.sample)
        model = linear_gaussian(q="perturbed" if which == "linear" else "full")
        x = model.sample_x(5, torch.Generator().manual_seed(3))
    one = ev.log_px(model, x, 50, chunk_size=50, seed=0, precision=precision)
    for chunk in (7, 1, None):  # 7: the last chunk is smaller than the others
        torch.testing.assert_close(ev.log_px(model, x, 50, chunk_size=chunk, seed=0, precision=precision),
                                   one, atol=1e-5, rtol=0)


def test_big_k_draws_in_several_rng_blocks(monkeypatch):
    monkeypatch.setattr(ev, "_RNG_BLOCK", 100)  # 100 numbers per RNG call: 5 samples of (B=5, D=4)
    model, x = small_vae(), binary_images(5)
    a = ev.log_px(model, x, 23, chunk_size=23, seed=0)
    torch.testing.assert_close(ev.log_px(model, x, 23, chunk_size=3, seed=0), a, atol=1e-5, rtol=0)


def test_same_seed_identical_other_seed_close_and_global_rng_untouched():
    model, x = small_vae(), binary_images(200)
    state = torch.get_rng_state()
    a = ev.log_px(model, x, 20, seed=0)
    b = ev.log_px(model, x, 20, seed=0)
    c = ev.log_px(model, x, 20, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    d = a - c
    assert d.abs().max() > 0
    assert abs(d.mean().item()) < 4 * d.std().item() / math.sqrt(len(d))


def test_estimate_nll_batches_and_seed():
    model, x = small_vae(), binary_images(23)
    r1 = ev.estimate_nll(model, x, 10, batch_size=5, progress=False, seed=0)
    r2 = ev.estimate_nll(model, x, 10, batch_size=5, progress=False, seed=0)
    assert r1 == r2
    assert r1["n_images"] == 23 and r1["k"] == 10 and r1["precision"] == "fp32"
    assert r1["estimator"] == ev.ESTIMATOR
    assert r1["nll"] > 0 and r1["nll_stderr"] > 0
    full = ev.estimate_nll(model, x, 10, batch_size=23, progress=False, seed=0)
    assert abs(full["nll"] - r1["nll"]) < 4 * r1["nll_stderr"]


def test_uint8_images_are_read_as_value_over_255():
    model, x = small_vae(), binary_images(7)
    a = ev.estimate_nll(model, x, 5, progress=False)
    b = ev.estimate_nll(model, (x * 255).to(torch.uint8), 5, progress=False)
    assert a == b


def test_bf16_close_to_fp32():
    model, x = small_vae(), binary_images(50)
    fp32 = ev.log_px(model, x, 100, seed=0)
    bf16 = ev.log_px(model, x, 100, precision="bf16", seed=0)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert abs((bf16 - fp32).mean().item()) < 0.05
    assert (bf16 - fp32).abs().max().item() < 0.5
    assert (bf16 != fp32).any()  # the bf16 path was taken


def test_gaussian_likelihood_log_px_is_the_written_out_importance_sampling_estimate():
    model = small_vae(likelihood="gaussian", sigma=0.3)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    est = ev.log_px(model, x, 10, seed=0)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        q = model.encode(x)
        z = q.sample((10,))  # (k, B, D)
        mean = model.decode(z).mean
        # log N(x; mean, 0.3² I) + log N(z; 0, I) − log q(z|x), written out
        log_lik = (-0.5 * ((x - mean) / 0.3) ** 2 - math.log(0.3) - 0.5 * math.log(2 * math.pi)).flatten(2).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        sd = q.base_dist.scale
        log_q = (-0.5 * ((z - q.mean) / sd) ** 2 - sd.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        ref = torch.logsumexp(log_lik + log_prior - log_q, 0) - math.log(10)
    torch.testing.assert_close(est, ref, rtol=1e-5, atol=1e-4)
    chunked = ev.log_px(model, x, 10, chunk_size=3, seed=0)  # other draws, the same quantity
    assert chunked.shape == (4,) and (chunked - est).abs().max() < 1.0


def test_bad_arguments_name_the_problem():
    model, x = small_vae(), binary_images(2)
    with pytest.raises(ConfigError, match="precision"):
        ev.log_px(model, x, 5, precision="fp16")
    with pytest.raises(ConfigError, match="k "):
        ev.log_px(model, x, 0)
    with pytest.raises(ConfigError, match="chunk_size"):
        ev.log_px(model, x, 5, chunk_size=0)
    for call in (lambda: ev.log_px(model, x, 5, y=torch.tensor([0, 1])),  # ignored labels would misname it
                 lambda: ev.elbo_terms(model, x, y_all=torch.tensor([0, 1])),
                 lambda: ev.active_units(model, x, y_all=torch.tensor([0, 1]))):
        with pytest.raises(ConfigError, match="not conditional"):
            call()
    with pytest.raises(ConfigError, match=r"values in \[0, 1\]; x holds 0 to 255"):
        ev.log_px(model, x * 255, 5)  # float pixels left unscaled
    with pytest.raises(ConfigError, match=r"shape \(B, 1, 6, 6\); got \(2, 36\)"):
        ev.log_px(model, x.flatten(1), 5)
    with pytest.raises(ConfigError, match="batch_size"):
        ev.nll_per_image(model, x, 5, batch_size=-1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_runs_on_the_models_device(precision):
    model = linear_gaussian(q="full")
    x = model.sample_x(6).cuda()
    model = model.cuda()
    est = ev.log_px(model, x, 50, seed=0, precision=precision)
    assert est.device.type == "cuda"
    torch.testing.assert_close(est, model.exact_log_px(x).detach(), atol=1e-2, rtol=0)
    vae = small_vae().cuda()
    out = ev.evaluate(vae, binary_images(20), k=10, precision=precision, progress=False)
    assert math.isfinite(out["nll"])


def test_training_mode_is_restored():
    model, x = small_vae(), binary_images(3)
    model.train()
    ev.log_px(model, x, 2)
    assert model.training


# ------------------------------------------------------------ elbo terms, active units, bits


def test_elbo_terms_consistent_and_repeatable():
    model, x = small_vae(), binary_images(300)
    state = torch.get_rng_state()
    a = ev.elbo_terms(model, x, batch_size=64, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == ev.elbo_terms(model, x, batch_size=64, seed=3)
    assert a["nelbo"] == pytest.approx(a["recon"] + a["kl"], rel=1e-6)
    assert len(a["kl_per_dim"]) == 4 and all(v >= 0 for v in a["kl_per_dim"])
    assert sum(a["kl_per_dim"]) == pytest.approx(a["kl"], rel=1e-6)
    b = ev.elbo_terms(model, x, batch_size=64, seed=4)
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-9)  # closed form: no sampling
    assert b["recon"] != a["recon"]


def test_elbo_terms_full_covariance_q_has_no_per_dim_kl():
    model = linear_gaussian(q="full")
    x = model.sample_x(10)
    out = ev.elbo_terms(model, x)
    assert out["kl_per_dim"] is None and out["kl"] > 0


def test_active_units_counts_the_dims_that_depend_on_x():
    model = small_vae(latent_dim=6)
    dead = [1, 4]
    with torch.no_grad():
        last = model.encoder[-1]  # outputs (μ, log σ²): rows 0..D-1 are μ
        last.weight[:6] *= 10  # live dims: clearly above the threshold
        last.weight[dead] = 0
        last.bias[dead] = 0.3  # constant μ, not necessarily zero
    x = binary_images(500)
    count, var = ev.active_units(model, x, batch_size=128)
    assert count == 4
    assert var.shape == (6,)
    assert torch.all(var[dead] < 1e-12)
    assert torch.all(var[[0, 2, 3, 5]] > 0.01)
    with torch.no_grad():  # the population variance (over N, not N − 1) of q's means over the images
        torch.testing.assert_close(var, encode_mean(model, x).double().var(0, correction=0), rtol=1e-5, atol=1e-9)
    # the threshold is strict: a dimension whose variance equals it is not active
    assert ev.active_units(model, x, threshold=float(var.max()))[0] == 0
    assert ev.active_units(model, x, threshold=float(var[[0, 2, 3, 5]].min()))[0] == 3


def test_a_two_layer_models_active_units_are_counted_per_layer_too():
    cfg = ModelConfig(arch="mlp2", latent_dim=3, latent1_dim=5, hidden=(16,), hidden2=(8,), activation="tanh",
                      input_shape=(1, 6, 6))
    model, x = build(cfg, seed=0), binary_images(30)
    out = ev.evaluate(model, x, k=2, progress=False)
    _, var = ev.active_units(model, x)
    assert var.shape == (8,)  # [z1, z2]
    assert out["active_units_z1"] == int((var[:5] > 0.01).sum()) and out["active_units_z2"] == int((var[5:] > 0.01).sum())
    assert out["active_units_z1"] + out["active_units_z2"] == out["active_units"]
    assert "active_units_z1" not in ev.evaluate(small_vae(), x, k=2, progress=False)


def test_bits_per_dim():
    assert ev.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert ev.bits_per_dim(88.0, 784) == pytest.approx(88.0 / 784 / math.log(2))


def test_bits_per_dim_only_for_binary_data_under_a_bernoulli_decoder():
    """A Gaussian decoder's nll is of a density (it can be negative): not a number of bits."""
    x = binary_images(20)
    assert "bits_per_dim" in ev.evaluate(small_vae(), x, k=2, progress=False)
    assert "bits_per_dim" not in ev.evaluate(small_vae(), x * 0.5, k=2, progress=False)
    assert "bits_per_dim" not in ev.evaluate(small_vae(likelihood="gaussian", sigma=0.1), x, k=2, progress=False)


def test_evaluate_names_everything():
    model, x = small_vae(), binary_images(40)
    out = ev.evaluate(model, x, k=8, batch_size=16, progress=False)
    for key in ("nll", "nll_stderr", "nelbo", "recon", "kl", "bits_per_dim", "active_units",
                "kl_per_dim", "k", "n_images", "precision", "estimator"):
        assert key in out, key
    assert out["k"] == 8 and out["n_images"] == 40 and out["precision"] == "fp32"
    assert out["estimator"] == "importance sampling, proposal q(z|x)"
    assert out["bits_per_dim"] == pytest.approx(out["nll"] / (36 * math.log(2)))
    assert out["nll"] <= out["nelbo"] + 3 * out["nelbo_stderr"]
