"""The model contract: shapes, distributions, init, and a save/load round trip."""

import re
from typing import get_args

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

from vaekit import runs
from vaekit.config import Activation, ModelConfig, RunConfig
from vaekit.models import REGISTRY, build
from vaekit.models.common import ACTIVATIONS
from vaekit.objectives import elbo

CONFIGS = [
    ModelConfig(latent_dim=2, hidden=(32,), input_shape=(1, 6, 5)),
    ModelConfig(latent_dim=4, hidden=(16, 8), activation="tanh", input_shape=(3, 4, 4), likelihood="gaussian", sigma=0.2),
    ModelConfig(latent_dim=3, hidden=(10,), input_shape=(7,), likelihood="gaussian", learn_sigma=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.likelihood}-{c.input_shape}")
def test_encode_decode_shapes_and_types(cfg):
    model = build(cfg)
    x = torch.rand(5, *cfg.input_shape)
    q = model.encode(x)
    assert isinstance(q, Independent) and isinstance(q.base_dist, Normal)
    assert q.batch_shape == (5,) and q.event_shape == (cfg.latent_dim,)
    z = q.rsample((7,))  # (k, B, D): the importance sampler's shape
    p = model.decode(z)
    assert p.batch_shape == (7, 5) and p.event_shape == cfg.input_shape
    base = Bernoulli if cfg.likelihood == "bernoulli" else Normal
    assert isinstance(p.base_dist, base)
    assert p.log_prob(x).shape == (7, 5)
    assert p.mean.shape == (7, 5, *cfg.input_shape)


def test_every_configurable_activation_builds():
    """The config's list of activation names and the models' table agree, name for name."""
    assert set(get_args(Activation)) == set(ACTIVATIONS)
    for name in ACTIVATIONS:
        model = build(ModelConfig(latent_dim=2, hidden=(8,), activation=name, input_shape=(5,)), seed=0)
        assert isinstance(model.encoder[1], ACTIVATIONS[name])
        assert torch.isfinite(elbo(model, torch.rand(3, 5)).loss).all()


def test_xavier_init_and_zero_bias():
    model = build(ModelConfig(latent_dim=20, hidden=(400,), input_shape=(1, 28, 28)))
    first = model.encoder[0]
    bound = (6 / (first.in_features + first.out_features)) ** 0.5
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
    assert torch.all(first.bias == 0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.likelihood}-{c.input_shape}")
def test_train_step_changes_weights_and_lowers_loss_on_fixed_batch(cfg):
    torch.manual_seed(0)
    model = build(cfg)
    x = torch.rand(32, *cfg.input_shape).round()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_at(seed):  # the same noise each time, so the comparison is about the weights
        torch.manual_seed(seed)
        return elbo(model, x).loss.mean()

    first = loss_at(123)
    for _ in range(20):
        opt.zero_grad()
        loss_at(1).backward()
        opt.step()
    assert loss_at(123) < first
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder") for k in changed) and any(k.startswith("decoder") for k in changed)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.likelihood}-{c.input_shape}")
def test_save_load_round_trip_gives_identical_outputs(cfg, tmp_path):
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():  # move away from the init so a fresh model would differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    runs.save_config(tmp_path, RunConfig(model=cfg))
    runs.save_weights(tmp_path / "model.safetensors", model)
    again = runs.load(tmp_path)
    x = torch.rand(4, *cfg.input_shape)
    z = torch.randn(6, cfg.latent_dim)
    assert torch.equal(model.encode(x).mean, again.encode(x).mean)
    assert torch.equal(model.encode(x).stddev, again.encode(x).stddev)
    assert torch.equal(model.decode(z).mean, again.decode(z).mean)
    assert torch.equal(model.decode(z).log_prob(x[:1]), again.decode(z).log_prob(x[:1]))


def test_registry_rejects_unknown_arch():
    from vaekit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model architecture 'nope'; available: mlp, conv, mlp2, poor-man"):
        build(ModelConfig(arch="nope"))
    assert set(REGISTRY) == {"mlp", "conv", "mlp2", "poor-man"}


@pytest.mark.parametrize("logit_shape, x_shape", [
    ((32, 1, 6, 6), (32, 1, 6, 6)),  # one sample per image
    ((5, 32, 1, 6, 6), (32, 1, 6, 6)),  # k samples against the images, broadcast
    ((5, 32, 36), (32, 36)),  # flat data
])
def test_bernoulli_likelihood_is_bitwise_torch_distributions(logit_shape, x_shape):
    from vaekit.models.common import IndependentBernoulli

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(logit_shape, generator=g) * 6).requires_grad_()
    x = (torch.rand(x_shape, generator=g) < 0.3).float()
    n = len(x_shape) - 1
    ours = IndependentBernoulli(logits, n).log_prob(x)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    ref = Independent(Bernoulli(logits=logits), n).log_prob(x)
    (grad_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert ours.shape == ref.shape == logit_shape[: len(logit_shape) - n]
    assert torch.equal(ours, ref) and torch.equal(grad_ours, grad_ref)


def test_two_layer_log_q_of_a_sample_reaches_every_encoder_weight_and_follows_an_edited_z():
    # log q(z|x) of a z drawn without a graph (score-function estimators use it) must still
    # differentiate q(z2|z1); and a z edited in place is scored as it now is, not as drawn.
    torch.manual_seed(0)
    model = build(ModelConfig(arch="mlp2", input_shape=(1, 4, 4), latent1_dim=3, latent_dim=2, hidden=(8,),
                              hidden2=(6,)))
    x = torch.rand(5, 1, 4, 4).round()
    q = model.encode(x)
    z = q.sample()
    q.log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("q_z2"))
    z = q.rsample()
    z[..., :3] += 1.0
    fresh = q.first.log_prob(z[..., :3]) + q.second(z[..., :3]).log_prob(z[..., 3:])
    torch.testing.assert_close(q.log_prob(z), fresh)


@pytest.mark.parametrize("arch", ["mlp", "conv", "mlp2", "poor-man"])
def test_wrong_images_or_codes_get_a_message_not_a_torch_error(arch):
    from vaekit.errors import ConfigError

    extra = {"channels": (4,)} if arch == "conv" else {}
    model = build(ModelConfig(arch=arch, input_shape=(1, 8, 8), latent_dim=3, hidden=(8,), **extra))
    x = torch.rand(2, 1, 8, 8).round()
    model.encode(x)  # the right shape passes
    for bad, words in ((x.flatten(1), "shape (B, 1, 8, 8); got (2, 64)"), (x[0], "got (1, 8, 8)"),
                       ((x * 255).to(torch.uint8), "float images"), (x.numpy(), "got numpy.ndarray"),
                       (x.double(), "computes in torch.float32 and x is torch.float64"),
                       (x.to("meta"), "x is on meta; move x first")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            model.encode(bad)
    with pytest.raises(ConfigError, match=re.escape(f"codes of size {model.latent_dim}")):
        model.decode(torch.zeros(2, model.latent_dim + 1))


def test_a_two_layer_model_works_under_inference_mode():
    # inference tensors have no version counter; the chain's cache must not ask for one
    from vaekit.evaluate import log_px

    torch.manual_seed(0)
    model = build(ModelConfig(arch="mlp2", input_shape=(1, 4, 4), latent1_dim=3, latent_dim=2, hidden=(8,),
                              hidden2=(6,)))
    x = torch.rand(3, 1, 4, 4).round()
    with torch.inference_mode():
        assert torch.isfinite(elbo(model, x).loss).all()
        assert torch.isfinite(log_px(model, x, 10, seed=0)).all()
        assert model.prior().sample((2,)).shape == (2, 5)
