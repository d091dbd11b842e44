"""What a user does with a trained model. Everything returns tensors; nothing writes files.

Images go in as float tensors (values in [0, 1] under a Bernoulli decoder) or as uint8
pixels, read as value/255. Images come back as the decoder's mean: pixel probabilities for a Bernoulli
likelihood, the Gaussian mean otherwise (clamped to [0, 1] only by the plots).
A conditional model (ModelConfig.n_classes > 0) needs the labels `y` wherever it
encodes or decodes; sampling takes the class to draw.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from vaekit.distributions import seeded
from vaekit.errors import ConfigError
from vaekit.models.common import as_input
from vaekit.objectives import decode, encode
from vaekit.plots import interpolation_z, manifold_z


def _device(model) -> torch.device:
    return next(model.parameters()).device


def n_classes(model) -> int:
    """How many classes a conditional model is conditioned on; 0 for an unconditional one."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "n_classes", 0) or 0


def _labels(model, label: int | torch.Tensor | None, n: int) -> torch.Tensor | None:
    """n labels for decoding: None for an unconditional model; a given class repeated; else 0, 1, … in turn."""
    classes = n_classes(model)
    if not classes:
        if label is not None:
            raise ConfigError("this model is not conditional: it takes no label. Train one with --preset cvae "
                              "or --set model.n_classes=N to draw by class.")
        return None
    if label is None:
        return torch.arange(n) % classes
    y = torch.as_tensor(label).long().expand(n) if torch.as_tensor(label).dim() == 0 else torch.as_tensor(label)
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ConfigError(f"label {label} is out of range: this model knows classes 0..{classes - 1}.")
    return y


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _prior_draw(model, n: int, seed: int | None) -> torch.Tensor:
    """n codes z ~ p(z), (n, D); with a seed repeatable, and the global random state left untouched;
    without one drawn from (and advancing) the global random state, so each call draws anew."""
    if seed is None:
        return model.prior().sample((n,))
    with seeded(seed, _device(model)):
        return model.prior().sample((n,))


@torch.no_grad()
def encode_mean(model, x: torch.Tensor, batch_size: int = 1000, y: torch.Tensor | None = None) -> torch.Tensor:
    """E_q[z|x] for each x: the code to use downstream. (N, *shape) -> (N, D)."""
    dev = _device(model)
    return torch.cat([
        encode(model, as_input(model, x[i : i + batch_size]).to(dev),
               _on(None if y is None else y[i : i + batch_size], dev)).mean.cpu()
        for i in range(0, len(x), batch_size)
    ])


@torch.no_grad()
def kl_by_dimension(model, x: torch.Tensor, batch_size: int = 1000,
                    y: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean KL(q(z_d|x) ‖ p(z_d)) of each latent dimension over x, in nats: (D,). A dimension near 0
    carries no information about x. None where q does not factorise by dimension (two stochastic layers)."""
    from vaekit.evaluate import _kl_per_dim

    dev = _device(model)
    parts = []
    for i in range(0, len(x), batch_size):
        y_part = None if y is None else y[i : i + batch_size].to(dev)
        part = _kl_per_dim(encode(model, as_input(model, x[i : i + batch_size]).to(dev), y_part), model.prior())
        if part is None:
            return None
        parts.append(part)
    return torch.cat(parts).mean(0).float()


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decode the posterior mean of each x: E_p[x | z = E_q[z|x]], shape of x."""
    dev = _device(model)
    y = _on(y, dev)
    return decode(model, encode(model, as_input(model, x).to(dev), y).mean, y).mean.cpu()


@torch.no_grad()
def sample(model, n: int, seed: int | None = None, label: int | torch.Tensor | None = None) -> torch.Tensor:
    """n images decoded from z ~ p(z) (N(0, I) for one stochastic layer): (n, *shape) decoder means.

    A conditional model draws from class `label` (an int, or n labels); without one it cycles
    through its classes 0, 1, 2, …. With a seed the draw is repeatable and the global random
    state is left untouched.
    """
    y = _labels(model, label, n)
    return decode(model, _prior_draw(model, n, seed), _on(y, _device(model))).mean.cpu()


@torch.no_grad()
def decode_mean(model, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder means of codes z (..., D); a conditional model takes one label per code, y of shape (...)."""
    dev = _device(model)
    if y is None:
        return decode(model, z.to(dev)).mean.cpu()
    flat = decode(model, z.reshape(-1, z.shape[-1]).to(dev), y.reshape(-1).to(dev)).mean.cpu()
    return flat.reshape(*z.shape[:-1], *flat.shape[1:])


@torch.no_grad()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10,
                y_a: torch.Tensor | None = None, y_b: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `steps` points on the line between the posterior means of x_a and x_b: (P, steps, *shape).

    A conditional model encodes each image with its own label and decodes the line with x_a's.
    """
    mu_a, mu_b = encode_mean(model, x_a, y=y_a), encode_mean(model, x_b, y=y_b)  # (P, D)
    z = torch.stack([interpolation_z(a, b, steps) for a, b in zip(mu_a, mu_b)])  # (P, steps, D)
    return decode_mean(model, z, None if y_a is None else y_a[:, None].expand(-1, steps))


@torch.no_grad()
def manifold(model, n: int = 20, label: int | None = None) -> torch.Tensor:
    """Decode an n×n grid of Gaussian quantiles of a 2-D latent space: (n*n, *shape).

    A conditional model draws the grid for class `label` (default 0).
    """
    if model.latent_dim != 2:
        raise ConfigError(f"the manifold grid needs a 2-D latent space; this model has {model.latent_dim} "
                          "dimensions (for two stochastic layers, z1 and z2 together). Its codes can be "
                          "written with `vaekit encode`; for the grid, train a one-layer model with "
                          "--latent-dim 2.")
    if label is None and n_classes(model):
        label = 0
    z = manifold_z(n)
    return decode_mean(model, z, _labels(model, label, len(z)))


@torch.no_grad()
def by_class(model, per_class: int = 10, seed: int = 0, classes: Sequence[int] | None = None) -> torch.Tensor:
    """A conditional model's samples, one row per class, the same z down each column: (C, per_class, *shape).

    classes: the labels of the rows, in order (default: every class, 0 to C − 1).
    """
    count = n_classes(model)
    if not count:
        raise ConfigError("by_class needs a conditional model (n_classes > 0).")
    rows = torch.arange(count) if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
    if rows.dim() != 1 or not len(rows) or not ((rows >= 0) & (rows < count)).all():
        raise ConfigError(f"classes must list labels between 0 and {count - 1}; got {rows.tolist()}.")
    z = _prior_draw(model, per_class, seed).expand(len(rows), -1, -1)  # (rows, per_class, D)
    return decode_mean(model, z, rows[:, None].expand(-1, per_class))


@torch.no_grad()
def traversal(model, x: torch.Tensor, dims: list[int], values: torch.Tensor,
              y: int | torch.Tensor | None = None) -> torch.Tensor:
    """Vary one latent dimension at a time around the code of one image x: (len(dims), len(values), *shape)."""
    def valid(d) -> bool:  # a whole number (numpy's too) in range
        try:
            return 0 <= operator.index(d) < model.latent_dim
        except TypeError:
            return False

    bad = [d for d in dims if not valid(d)]
    if bad:
        raise ConfigError(f"dims {bad} are not latent dimensions of this model (0..{model.latent_dim - 1}).")
    y1 = None if y is None else torch.as_tensor(y).long().reshape(1)
    base = encode_mean(model, x[None], y=y1)[0]  # (D,)
    z = base.repeat(len(dims), len(values), 1)  # (dims, values, D)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return decode_mean(model, z, None if y1 is None else y1.expand(len(dims), len(values)))
