"""What a user does with a trained model: checked against the model's own encoder and decoder."""

import torch

from vaekit import generate
from vaekit.config import ModelConfig
from vaekit.models import build
from vaekit.objectives import decode, encode
from vaekit.plots import manifold_z


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


def test_sample_decodes_draws_from_the_prior():
    """With a seed: the decoder means of N(0, I) draws under that seed, the global random state
    untouched. Without one: a new draw each call, from the global random state."""
    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=3, hidden=[16]), seed=0).eval()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    images = generate.sample(model, 8, seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = decode(model, torch.randn(8, 3)).mean
    torch.testing.assert_close(images, expected)
    assert torch.equal(generate.sample(model, 8, seed=11), images)
    torch.manual_seed(5)
    first, second = generate.sample(model, 8), generate.sample(model, 8)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(generate.sample(model, 8), first)


def test_encode_mean_is_the_encoders_mean_in_batches():
    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=3, hidden=[16]), seed=0).eval()
    x = torch.rand(7, 1, 6, 6).bernoulli()
    with torch.no_grad():
        whole = encode(model, x).mean
    torch.testing.assert_close(generate.encode_mean(model, x, batch_size=3), whole)


def test_kl_by_dimension_is_the_mean_closed_form_kl_and_picks_the_traversed_dimensions():
    from torch.distributions import Normal, kl_divergence

    from vaekit import figures

    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=12, hidden=[16]), seed=0).eval()
    x = torch.rand(9, 1, 6, 6).bernoulli()
    with torch.no_grad():
        q = encode(model, x)
    expected = kl_divergence(q.base_dist, Normal(torch.zeros(12), torch.ones(12))).mean(0)
    kl = generate.kl_by_dimension(model, x, batch_size=4)  # batches of 4, 4 and 1, each image counted once
    torch.testing.assert_close(kl, expected)
    dims = figures.traversed_dims(12, kl)
    assert dims == sorted(range(12), key=lambda d: -float(kl[d]))[: figures.N_TRAVERSED]
    assert figures.traversed_dims(12, None) == list(range(figures.N_TRAVERSED))
    assert figures.traversed_dims(5, kl[:5]) == [0, 1, 2, 3, 4]  # few enough: all, in order
    two = build(ModelConfig(arch="mlp2", input_shape=[1, 6, 6], latent_dim=2, latent1_dim=3, hidden=[8],
                            hidden2=[8]), seed=0).eval()
    assert generate.kl_by_dimension(two, x) is None  # q(z1, z2 | x) does not factorise by dimension


def test_traversal_sets_one_dimension_of_the_images_code_at_a_time():
    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=4, hidden=[16]), seed=0).eval()
    x = torch.rand(1, 1, 6, 6).bernoulli()
    dims, values = [0, 2], torch.tensor([-2.0, 0.0, 1.5])
    grid = generate.traversal(model, x[0], dims, values)
    assert grid.shape == (2, 3, 1, 6, 6)
    with torch.no_grad():
        base = encode(model, x).mean[0]
        for r, d in enumerate(dims):
            for j, v in enumerate(values):
                z = base.clone()
                z[d] = v  # only dimension d moves; the others stay at the image's code
                torch.testing.assert_close(grid[r, j], decode(model, z[None]).mean[0])


def test_the_manifold_decodes_gaussian_quantiles_row_by_row_and_a_conditional_one_class_0():
    from torch.distributions import Normal

    model = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=2, hidden=[16]), seed=0).eval()
    n = 3
    q = Normal(0.0, 1.0).icdf(torch.tensor([0.05, 0.5, 0.95]))
    images = generate.manifold(model, n)
    assert images.shape == (n * n, 1, 6, 6)
    with torch.no_grad():
        for i in range(n):
            for j in range(n):  # row i, column j: z1 grows with j, z2 falls with i
                z = torch.tensor([[q[j], q[n - 1 - i]]])
                torch.testing.assert_close(images[i * n + j], decode(model, z).mean[0], atol=1e-5, rtol=1e-5)
    cvae = build(ModelConfig(input_shape=[1, 6, 6], latent_dim=2, hidden=[16], n_classes=3), seed=0).eval()
    with torch.no_grad():
        zero = decode(cvae, manifold_z(n).float(), torch.zeros(n * n, dtype=torch.long)).mean
    torch.testing.assert_close(generate.manifold(cvae, n), zero)
    assert not torch.allclose(generate.manifold(cvae, n, label=2), zero)


def test_a_grid_or_a_traversal_the_model_cannot_draw_is_named():
    import pytest

    from vaekit.errors import ConfigError

    model = build(ModelConfig(latent_dim=3, hidden=(8,), input_shape=(1, 4, 4)))
    with pytest.raises(ConfigError, match="2-D latent space; this model has 3"):
        generate.manifold(model, 4)
    x = torch.rand(1, 4, 4).round()
    with pytest.raises(ConfigError, match=r"dims \[3, -1\] are not latent dimensions .*0\.\.2"):
        generate.traversal(model, x, [0, 3, -1], torch.linspace(-2, 2, 5))
    assert generate.traversal(model, x, [0, 2], torch.linspace(-2, 2, 5)).shape == (2, 5, 1, 4, 4)
    import numpy as np

    dims = list(np.arange(3))  # numpy's whole numbers are dimensions too
    assert generate.traversal(model, x, dims, torch.linspace(-2, 2, 5)).shape == (3, 5, 1, 4, 4)


def test_the_helpers_read_uint8_as_pixels_and_refuse_floats_out_of_range_or_arrays():
    import numpy as np
    import pytest

    from vaekit.errors import ConfigError
    from vaekit.evaluate import elbo_terms, log_px

    model = build(ModelConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,)), seed=0)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = (x * 255).round().to(torch.uint8)
    assert torch.equal(generate.reconstruct(model, pixels), generate.reconstruct(model, pixels.float() / 255))
    assert torch.equal(generate.encode_mean(model, pixels), generate.encode_mean(model, pixels.float() / 255))
    for helper in (generate.reconstruct, generate.encode_mean, generate.kl_by_dimension,
                   lambda m, v: log_px(m, v, k=3), lambda m, v: elbo_terms(m, v)):
        with pytest.raises(ConfigError, match=r"x holds \d+ to 25\d"):
            helper(model, pixels.float())  # 0..255 as floats: NaN log-likelihoods, if let through
        with pytest.raises(ConfigError, match="torch.as_tensor"):
            helper(model, x.numpy())
    # numpy's integers count as whole numbers
    assert torch.equal(generate.sample(model, np.int64(3), seed=np.int64(1)), generate.sample(model, 3, seed=1))
    assert torch.equal(log_px(model, x, k=np.int64(4), seed=0), log_px(model, x, k=4, seed=0))
