"""One contract, run over every registered model: what any vaekit model must do."""

import pytest
import torch

from vaekit import generate, runs
from vaekit.config import ModelConfig, RunConfig
from vaekit.evaluate import log_px
from vaekit.errors import ConfigError
from vaekit.models import REGISTRY, build
from vaekit.models.common import fit_output_bias_
from vaekit.objectives import decode, elbo, encode, iwae

TINY = {
    "mlp": dict(hidden=(16,), latent_dim=3),
    "conv": dict(hidden=(8,), channels=(4, 6), latent_dim=3),
    "mlp2": dict(hidden=(16,), hidden2=(8,), latent1_dim=4, latent_dim=2, activation="tanh"),
    "poor-man": dict(hidden=(16,), latent_dim=3, likelihood="gaussian", sigma=0.5),
}
SHAPE = (1, 9, 7)  # odd sizes on purpose: nothing may assume 28×28
# Every architecture, and the conditional (labelled) variants of those that have one.
CASES = {arch: ModelConfig(arch=arch, input_shape=SHAPE, **tiny) for arch, tiny in TINY.items()} | {
    f"{arch}-conditional": ModelConfig(arch=arch, input_shape=SHAPE, n_classes=3, **TINY[arch])
    for arch in ("mlp", "conv")
}


def test_every_registered_model_has_a_tiny_config():
    assert set(TINY) == set(REGISTRY)


@pytest.fixture(params=sorted(CASES))
def cfg(request):
    return CASES[request.param]


def labels(cfg, n):
    return torch.arange(n) % cfg.n_classes if cfg.n_classes else None


def test_contract(cfg, tmp_path):
    torch.manual_seed(0)
    model = build(cfg, seed=0)
    x = torch.rand(16, *SHAPE).round()
    y = labels(cfg, 16)

    # the interface: distributions with the right shapes
    q = encode(model, x, y)
    assert q.batch_shape == (16,) and q.event_shape == (model.latent_dim,)
    z = q.rsample((3,))
    assert z.shape == (3, 16, model.latent_dim)
    assert decode(model, z, y).log_prob(x).shape == (3, 16)
    assert model.prior().log_prob(z).shape == (3, 16)

    # a train step changes the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    elbo(model, x, y=y).loss.mean().backward()
    opt.step()
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.dtype.is_floating_point)

    # save -> load gives identical outputs
    runs.save_config(tmp_path, RunConfig(model=cfg))
    runs.save_weights(tmp_path / "model.safetensors", model)
    again = runs.load(tmp_path)
    model.eval()
    assert torch.equal(generate.reconstruct(model, x, y), generate.reconstruct(again, x, y))
    assert torch.equal(generate.sample(model, 5, seed=1), generate.sample(again, 5, seed=1))

    # samples, reconstructions, and a finite log p(x) estimate that bounds the ELBO from above on average
    assert generate.sample(model, 5, seed=1).shape == (5, *SHAPE)
    assert generate.reconstruct(model, x, y).shape == x.shape
    lp = log_px(model, x, k=200, y=y)
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    with torch.no_grad():
        elbos = torch.stack([elbo(model, x, y=y).elbo for _ in range(50)]).mean(0)
    assert lp.mean() > elbos.mean()


def test_iwae_k1_is_the_elbo_on_the_same_sample(cfg):
    model = build(cfg, seed=0)
    x = torch.rand(8, *SHAPE).round()
    y = labels(cfg, 8)
    torch.manual_seed(3)
    parts = iwae(model, x, 1, y)
    torch.manual_seed(3)
    q = encode(model, x, y)
    z = q.rsample((1,))[0]
    # ELBO on that sample: log p(x|z) − [log q(z|x) − log p(z)]
    expected = decode(model, z, y).log_prob(x) - (q.log_prob(z) - model.prior().log_prob(z))
    torch.testing.assert_close(parts.elbo_k, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts.elbo_k, -(parts.distortion + parts.rate), rtol=1e-5, atol=1e-4)


def test_output_bias_fitted_to_the_data_mean_starts_p_x_at_that_mean(cfg):
    """With the output layer's weights zeroed, p(x|z) is the bias alone: its mean must be the data's."""
    model = build(cfg, seed=0)
    mean = torch.rand(*SHAPE) * 0.8 + 0.1
    mean[0, 0, 0] = 0.0  # an always-white pixel: clipped to 0.001, not an infinite logit
    fit_output_bias_(model, mean)
    with torch.no_grad():
        model.output_layer.weight.zero_()
    z = torch.randn(5, model.latent_dim)
    got = decode(model, z, labels(cfg, 5)).mean
    want = mean
    if cfg.arch == "conv":  # one bias per channel: the channel's average
        want = want.mean(dim=(-2, -1), keepdim=True).expand(SHAPE)
    if cfg.likelihood == "bernoulli":
        want = want.clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(got, want.expand_as(got), rtol=1e-5, atol=1e-6)


def test_output_bias_refuses_a_mean_of_another_shape(cfg):
    model = build(cfg, seed=0)
    with pytest.raises(ConfigError, match="do not match"):
        fit_output_bias_(model, torch.rand(2, 9, 7))
