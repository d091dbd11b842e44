"""What a user does with a trained model. Everything returns tensors; nothing writes files.

Images come back as the decoder's mean: pixel probabilities for a Bernoulli
likelihood, the Gaussian mean otherwise (clamped to [0, 1] only by the plots).
"""

from __future__ import annotations

import torch

from vaekit.plots import interpolation_z, manifold_z


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_mean(model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """E_q[z|x] for each x: the code to use downstream. (N, *shape) -> (N, D)."""
    dev = _device(model)
    return torch.cat([model.encode(x[i : i + batch_size].to(dev)).mean.cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean of each x: E_p[x | z = E_q[z|x]], shape of x."""
    return model.decode(model.encode(x.to(_device(model))).mean).mean.cpu()


@torch.no_grad()
def sample(model, n: int, seed: int | None = None) -> torch.Tensor:
    """n images decoded from z ~ p(z) (N(0, I) for one stochastic layer): (n, *shape) decoder means.

    With a seed the draw is repeatable and the global random state is left untouched.
    """
    with torch.random.fork_rng(devices=[] if _device(model).type == "cpu" else [_device(model)]):
        if seed is not None:
            torch.manual_seed(seed)
        z = model.prior().sample((n,))  # (n, D)
    return model.decode(z).mean.cpu()


@torch.no_grad()
def decode_mean(model, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z.to(_device(model))).mean.cpu()


@torch.no_grad()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode `steps` points on the line between the posterior means of x_a and x_b: (P, steps, *shape)."""
    mu_a, mu_b = encode_mean(model, x_a), encode_mean(model, x_b)  # (P, D)
    z = torch.stack([interpolation_z(a, b, steps) for a, b in zip(mu_a, mu_b)])  # (P, steps, D)
    return decode_mean(model, z)


@torch.no_grad()
def manifold(model, n: int = 20) -> torch.Tensor:
    """Decode an n×n grid of Gaussian quantiles of a 2-D latent space: (n*n, *shape)."""
    if model.latent_dim != 2:
        raise ValueError(f"the manifold grid needs a 2-D latent space; this model has {model.latent_dim}.")
    return decode_mean(model, manifold_z(n))


@torch.no_grad()
def traversal(model, x: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Vary one latent dimension at a time around the code of one image x: (len(dims), len(values), *shape)."""
    base = encode_mean(model, x[None])[0]  # (D,)
    z = base.repeat(len(dims), len(values), 1)  # (dims, values, D)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return decode_mean(model, z)
