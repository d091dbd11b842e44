"""One contract, run over every registered model: what any vaekit model must do."""

import pytest
import torch

from vaekit import generate, runs
from vaekit.config import ModelConfig, RunConfig
from vaekit.evaluate import log_px
from vaekit.models import REGISTRY, build
from vaekit.objectives import elbo, iwae

TINY = {
    "mlp": dict(hidden=(16,), latent_dim=3),
    "conv": dict(hidden=(8,), channels=(4, 6), latent_dim=3),
    "mlp2": dict(hidden=(16,), hidden2=(8,), latent1_dim=4, latent_dim=2, activation="tanh"),
    "poor-man": dict(hidden=(16,), latent_dim=3, likelihood="gaussian", sigma=0.5),
}
SHAPE = (1, 9, 7)  # odd sizes on purpose: nothing may assume 28×28


def test_every_registered_model_has_a_tiny_config():
    assert set(TINY) == set(REGISTRY)


@pytest.fixture(params=sorted(REGISTRY))
def cfg(request):
    return ModelConfig(arch=request.param, input_shape=SHAPE, **TINY[request.param])


def test_contract(cfg, tmp_path):
    torch.manual_seed(0)
    model = build(cfg, seed=0)
    x = torch.rand(16, *SHAPE).round()

    # the interface: distributions with the right shapes
    q = model.encode(x)
    assert q.batch_shape == (16,) and q.event_shape == (model.latent_dim,)
    z = q.rsample((3,))
    assert z.shape == (3, 16, model.latent_dim)
    assert model.decode(z).log_prob(x).shape == (3, 16)
    assert model.prior().log_prob(z).shape == (3, 16)

    # a train step changes the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    elbo(model, x).loss.mean().backward()
    opt.step()
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.dtype.is_floating_point)

    # save -> load gives identical outputs
    runs.save_config(tmp_path, RunConfig(model=cfg))
    runs.save_weights(tmp_path / "model.safetensors", model)
    again = runs.load(tmp_path)
    model.eval()
    assert torch.equal(generate.reconstruct(model, x), generate.reconstruct(again, x))
    assert torch.equal(generate.sample(model, 5, seed=1), generate.sample(again, 5, seed=1))

    # samples, reconstructions, and a finite log p(x) estimate that bounds the ELBO from above on average
    assert generate.sample(model, 5, seed=1).shape == (5, *SHAPE)
    assert generate.reconstruct(model, x).shape == x.shape
    lp = log_px(model, x, k=200)
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    with torch.no_grad():
        elbos = torch.stack([elbo(model, x).elbo for _ in range(50)]).mean(0)
    assert lp.mean() > elbos.mean()


def test_iwae_k1_is_the_elbo_on_the_same_sample(cfg):
    model = build(cfg, seed=0)
    x = torch.rand(8, *SHAPE).round()
    torch.manual_seed(3)
    parts = iwae(model, x, 1)
    torch.manual_seed(3)
    q = model.encode(x)
    z = q.rsample((1,))[0]
    # ELBO on that sample: log p(x|z) − [log q(z|x) − log p(z)]
    expected = model.decode(z).log_prob(x) - (q.log_prob(z) - model.prior().log_prob(z))
    torch.testing.assert_close(parts.elbo_k, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts.elbo_k, -(parts.distortion + parts.rate), rtol=1e-5, atol=1e-4)
