"""The figures of a run, as the VAE tutorials show them: tensors in, named figures out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from vaekit import generate, plots
from vaekit.config import ModelConfig

# the figures a run can have, in the order the report shows them
NAMES = ("reconstructions.png", "samples.png", "classes.png", "latent.png", "manifold.png", "interpolations.png",
         "traversal.png", "training.png")
N_LATENT = 5000  # images in the latent scatter
N_TRAVERSED = 10  # latent dimensions in the traversal
N_MANIFOLD = 20  # the manifold grid is N_MANIFOLD × N_MANIFOLD
N_CLASS_ROWS = 20  # rows of the conditional samples: beyond this many classes, evenly spaced ones
TRAVERSAL_VALUES = (-3.0, 3.0, 9)  # linspace(-3, 3, 9)
N_KL = 1000  # images over which each latent dimension's KL is averaged, to choose the traversed ones
MANIFOLD_EXTENT = float(plots.manifold_z(2).max())  # the manifold grid's outer z: 1.64, the 95 % Gaussian quantile


def display_range(x: torch.Tensor) -> tuple[float, float] | None:
    """(lo, hi) to draw images of data x from black (lo) to white (hi) where x leaves [0, 1] (a Gaussian
    decoder's data may), else None: images in [0, 1] are drawn as they are."""
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        return None
    return lo, hi if hi > lo else lo + 1


def traversed_dims(latent_dim: int, kl: torch.Tensor | None) -> list[int]:
    """The dimensions the traversal varies: all, in order, if there are at most N_TRAVERSED; else the
    N_TRAVERSED with the largest KL, largest first (the first N_TRAVERSED if the KL is unknown)."""
    if latent_dim <= N_TRAVERSED or kl is None:
        return list(range(min(latent_dim, N_TRAVERSED)))
    return torch.argsort(kl, descending=True, stable=True)[:N_TRAVERSED].tolist()


def shown_classes(n_classes: int) -> list[int]:
    """The labels the conditional-samples figure has a row for: all, or N_CLASS_ROWS evenly spaced."""
    if n_classes <= N_CLASS_ROWS:
        return list(range(n_classes))
    return [round(i * (n_classes - 1) / (N_CLASS_ROWS - 1)) for i in range(N_CLASS_ROWS)]


def captions(model: ModelConfig, split: str, n_images: int | None = None, labelled: bool = True,
             value_range: Sequence[float] | None = None) -> dict[str, str]:
    """What each figure of a run shows and how to read it, for a model of config ``model`` whose
    figures were drawn from ``n_images`` images of ``split`` (``labelled``: the images came with labels;
    ``value_range``: the images were drawn from its low (black) to its high (white), see display_range)."""
    d = model.latent_dim
    prior = "z2 ~ N(0, I), then z1 ~ p(z1|z2)" if model.arch == "mlp2" else "z ~ N(0, I)"
    probabilities = (" For a Bernoulli decoder the means are pixel probabilities, so they look grey where the "
                     "originals (binarized draws, if the run binarizes) are black or white."
                     if model.likelihood == "bernoulli" else "")
    n_latent = N_LATENT if n_images is None else min(N_LATENT, n_images)
    latent = f"Means of q(z|x) for the first {n_latent} {split} images" + (", coloured by label" if labelled else "")
    if d > 2:
        latent += ", projected on their first two principal components (their share of the variance on the axes)"
    if d == 2:
        latent += (f"; the dashed square is the manifold grid's extent (±{MANIFOLD_EXTENT:.2f}): codes outside it "
                   "are in the prior's outer 10 % in that coordinate, which the grid does not draw")
    if model.n_classes:
        latent += ". This model is given the label, so its z need not cluster by it: z holds the style"
    lo, hi, _ = TRAVERSAL_VALUES
    factorised = model.arch != "mlp2"  # two stochastic layers: no KL per dimension
    if d <= N_TRAVERSED:
        which = "every dimension of z"
    elif factorised:
        which = f"the {N_TRAVERSED} dimensions of z with the largest KL, largest first"
    else:
        which = f"the first {N_TRAVERSED} dimensions of z"
    kl_note = (f" Beside each name is that dimension's KL(q ‖ p) in nats, averaged over {N_KL} {split} images: "
               "a dimension near 0 carries almost nothing about the image, so varying it changes little."
               if factorised else "")
    scale = ("" if value_range is None else
             f" The data leaves [0, 1], so every image of this report is drawn from {value_range[0]:.3g} (black) to "
             f"{value_range[1]:.3g} (white), the range of the {split} images; decoded values beyond it are clipped.")
    return {
        "reconstructions.png": f"{split.capitalize()} images (top) and their reconstructions (bottom): the "
                               f"decoder's mean at z = the mean of q(z|x).{probabilities}{scale}",
        "samples.png": f"The decoder's mean for 64 draws from the prior, {prior}: what the model generates, "
                       "without the noise of p(x|z)"
                       + (" (pixel probabilities, for a Bernoulli decoder)." if probabilities else "."),
        "classes.png": ("Conditional samples: one row per class" if model.n_classes <= N_CLASS_ROWS else
                        f"Conditional samples: one row for each of {N_CLASS_ROWS} of the {model.n_classes} classes, "
                        "evenly spaced") + ", the same draw of z down each column, so what z holds (style) "
                       "separates from what the label holds (the class).",
        "latent.png": latent + ".",
        "manifold.png": f"The learned 2-D manifold: the decoder's mean on a {N_MANIFOLD} × {N_MANIFOLD} grid of z "
                        f"at the Gaussian quantiles from 5 % to 95 % (±{MANIFOLD_EXTENT:.2f}), z1 growing to the "
                        "right and z2 upwards (Kingma & Welling 2013, Fig. 4). It shows what the prior's central "
                        "region decodes to; the latent figure shows which codes real images get.",
        "interpolations.png": f"Decoding along straight lines between the means of q(z|x) of random pairs of "
                              f"{split} images: the two images stand at the ends of each row, and the decoded line "
                              "runs from the first one's reconstruction (t = 0) to the second one's (t = 1).",
        "traversal.png": f"Latent traversal: z starts at the mean of q(z|x) for {split} image 0; each row sets one "
                         f"dimension to the values {lo:g} to {hi:g} across, the others kept ({which}). The red "
                         "triangle marks the image's own value of that dimension (at an end, pointing out, if it "
                         f"lies beyond the range).{kl_note}",
        "training.png": "Training curves in nats per example: train is the mean over each epoch's steps, valid is "
                        "measured at the epoch's end; the dotted line marks the best epoch, whose weights the "
                        "figures use.",
    }


def run_figures(
    model,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    metrics: list[dict],
    *,
    n_show: int = 8,
    n_latent: int = N_LATENT,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    train_is_elbo: bool = True,
) -> dict[str, Figure]:
    """All figures of a run from evaluation images x (N, *shape); where x leaves [0, 1], every image
    is drawn from x's lowest value (black) to its highest (white) (display_range).

    A conditional model is given the labels wherever it encodes, and gets a figure of its own:
    one row of samples per class. class_names[c] names label c (an image folder's subfolders).
    train_is_elbo=False: the training loss is not an ELBO in nats (the poor man's norm penalty).
    """
    g = torch.Generator().manual_seed(seed)
    y = labels if generate.n_classes(model) else None  # what the model is conditioned on
    span = display_range(x)

    def drawn(images: torch.Tensor) -> torch.Tensor:  # values as the plots draw them: [0, 1] black to white
        return images if span is None else (images - span[0]) / (span[1] - span[0])

    show = x[:n_show]
    y_show = None if y is None else y[:n_show]
    y_latent = None if y is None else y[:n_latent]
    figs: dict[str, Figure] = {
        "reconstructions.png": plots.reconstructions(drawn(show), drawn(generate.reconstruct(model, show, y_show))),
        "samples.png": plots.samples(drawn(generate.sample(model, 64, seed=seed))),
        "latent.png": plots.latent_scatter(
            generate.encode_mean(model, x[:n_latent], y=y_latent), None if labels is None else labels[:n_latent],
            class_names=class_names, box=MANIFOLD_EXTENT if model.latent_dim == 2 else None,
        ),
    }
    if y is not None:
        rows = shown_classes(generate.n_classes(model))
        figs["classes.png"] = plots.by_class(drawn(generate.by_class(model, 10, seed=seed, classes=rows)),
                                             class_names=[class_names[c] if class_names else str(c) for c in rows])
    if model.latent_dim == 2:
        if y is None:
            figs["manifold.png"] = plots.manifold(drawn(generate.manifold(model, N_MANIFOLD)), N_MANIFOLD)
        else:
            name = class_names[0] if class_names else "0"
            figs["manifold.png"] = plots.manifold(drawn(generate.manifold(model, N_MANIFOLD, label=0)), N_MANIFOLD,
                                                  title=f"Learned 2-D manifold of class {name} (the label fixed, z varied)")
    n_pairs = min(5, len(x) // 2)  # up to 5 random pairs of images (a small data set has fewer)
    if n_pairs:
        pairs = torch.randperm(len(x), generator=g)[: 2 * n_pairs].view(n_pairs, 2)
        figs["interpolations.png"] = plots.interpolations(drawn(generate.interpolate(
            model, x[pairs[:, 0]], x[pairs[:, 1]], steps=10,
            y_a=None if y is None else y[pairs[:, 0]], y_b=None if y is None else y[pairs[:, 1]])),
            originals=drawn(x[pairs]))
    kl = generate.kl_by_dimension(model, x[:N_KL], y=None if y is None else y[:N_KL])
    dims = traversed_dims(model.latent_dim, kl)
    values = torch.linspace(*TRAVERSAL_VALUES)
    y0 = None if y is None else y[:1]
    figs["traversal.png"] = plots.latent_traversal(
        drawn(generate.traversal(model, x[0], dims, values, None if y is None else y[0])), dims, values,
        own=generate.encode_mean(model, x[:1], y=y0)[0, dims], kl=None if kl is None else kl[dims])
    if metrics:
        from vaekit.train import selection_score

        best = min((m for m in metrics if "valid_nelbo" in m), key=selection_score, default=None)
        figs["training.png"] = plots.training_curves(metrics, best_epoch=None if best is None else best["epoch"],
                                                     train_is_elbo=train_is_elbo)
    return {name: figs[name] for name in NAMES if name in figs}
