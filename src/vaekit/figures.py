"""The figures of a run, as the VAE tutorials show them: tensors in, named figures out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from vaekit import generate, plots

# file name -> caption, in the order the report shows them
CAPTIONS = {
    "reconstructions.png": "Test images (top) and their reconstructions from the posterior mean (bottom).",
    "samples.png": "Images decoded from z ~ N(0, I): what the model generates.",
    "classes.png": "Conditional samples: one row per class, the same z ~ N(0, I) down each column.",
    "latent.png": "Posterior means of test images, coloured by label.",
    "manifold.png": "The learned 2-D manifold: decoded Gaussian quantiles of the latent space.",
    "interpolations.png": "Decoding along straight lines between the posterior means of pairs of test images.",
    "traversal.png": "Latent traversal: one latent dimension varied at a time, the others fixed.",
    "training.png": "Training curves: negative ELBO and its parts per epoch.",
}


def run_figures(
    model,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    metrics: list[dict],
    *,
    n_show: int = 8,
    n_latent: int = 5000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """All figures of a run from evaluation images x (N, *shape) in [0, 1].

    A conditional model is given the labels wherever it encodes, and gets a figure of its own:
    one row of samples per class. class_names[c] names label c (an image folder's subfolders).
    """
    g = torch.Generator().manual_seed(seed)
    y = labels if generate.n_classes(model) else None  # what the model is conditioned on
    show = x[:n_show]
    y_show = None if y is None else y[:n_show]
    y_latent = None if y is None else y[:n_latent]
    figs: dict[str, Figure] = {
        "reconstructions.png": plots.reconstructions(show, generate.reconstruct(model, show, y_show)),
        "samples.png": plots.samples(generate.sample(model, 64, seed=seed)),
        "latent.png": plots.latent_scatter(
            generate.encode_mean(model, x[:n_latent], y=y_latent), None if labels is None else labels[:n_latent],
            class_names=class_names,
        ),
    }
    if y is not None:
        figs["classes.png"] = plots.by_class(generate.by_class(model, 10, seed=seed), class_names=class_names)
    if model.latent_dim == 2:
        if y is None:
            figs["manifold.png"] = plots.manifold(generate.manifold(model, 20), 20)
        else:
            figs["manifold.png"] = plots.manifold(generate.manifold(model, 20, label=0), 20,
                                                  title="Learned 2-D manifold of class 0 (the label fixed, z varied)")
    n_pairs = min(5, len(x) // 2)  # up to 5 random pairs of images (a small data set has fewer)
    if n_pairs:
        pairs = torch.randperm(len(x), generator=g)[: 2 * n_pairs].view(n_pairs, 2)
        figs["interpolations.png"] = plots.interpolations(generate.interpolate(
            model, x[pairs[:, 0]], x[pairs[:, 1]], steps=10,
            y_a=None if y is None else y[pairs[:, 0]], y_b=None if y is None else y[pairs[:, 1]]))
    dims = list(range(min(model.latent_dim, 10)))
    values = torch.linspace(-3, 3, 9)
    figs["traversal.png"] = plots.latent_traversal(
        generate.traversal(model, x[0], dims, values, None if y is None else y[0]), dims, values)
    if metrics:
        figs["training.png"] = plots.training_curves(metrics)
    return {name: figs[name] for name in CAPTIONS if name in figs}
