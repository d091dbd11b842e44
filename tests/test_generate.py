"""What a user does with a trained model: checked against the model's own encoder and decoder."""

import torch

from vaekit import generate
from vaekit.config import ModelConfig
from vaekit.models import build
from vaekit.objectives import decode, encode


def test_interpolation_runs_from_one_reconstruction_to_the_other_along_a_line():
    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=3, hidden=[16]), seed=0).eval()
    x = torch.rand(4, 1, 6, 6).bernoulli()
    strips = generate.interpolate(model, x[:2], x[2:], steps=5)
    assert strips.shape == (2, 5, 1, 6, 6)
    torch.testing.assert_close(strips[:, 0], generate.reconstruct(model, x[:2]))
    torch.testing.assert_close(strips[:, -1], generate.reconstruct(model, x[2:]))
    with torch.no_grad():
        mid = (encode(model, x[:2]).mean + encode(model, x[2:]).mean) / 2
        torch.testing.assert_close(strips[:, 2], decode(model, mid).mean)


def test_encode_mean_is_the_encoders_mean_in_batches():
    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=3, hidden=[16]), seed=0).eval()
    x = torch.rand(7, 1, 6, 6).bernoulli()
    with torch.no_grad():
        whole = encode(model, x).mean
    torch.testing.assert_close(generate.encode_mean(model, x, batch_size=3), whole)
