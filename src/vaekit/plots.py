"""Figures from tensors.

Every function here takes tensors (or numpy arrays) and returns a
``matplotlib.figure.Figure``; nothing is written to disk and no pyplot state is
touched, so it works headless and many figures can be made without leaking
memory. The caller saves them with ``fig.savefig(path, dpi=...)``.

Images are (N, C, H, W) floats in [0, 1] with C = 1 (drawn in gray) or C = 3
(RGB); uint8 images are divided by 255 and values outside [0, 1] are clipped.
Flat (N, D) vectors are drawn as 1 x D strips. No size (28 x 28, 784) is assumed.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

_PAD_VALUE = 0.5  # mid-gray gaps between tiles: visible on black and on white backgrounds


def _as_images(x, lead: int) -> np.ndarray:
    """Any array with ``lead`` batch dims then (C, H, W) or (D,) -> float32 (*batch, C, H, W)."""
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    batch, item = a.shape[:lead], a.shape[lead:]
    if a.ndim < lead or len(item) not in (1, 3) or (len(item) == 3 and item[0] not in (1, 3)):
        raise ValueError(
            f"expected images shaped {'(' + ', '.join('N' * lead)}, C, H, W) with C = 1 or 3, "
            f"or flat vectors {'(' + ', '.join('N' * lead)}, D); got shape {tuple(a.shape)}"
        )
    if len(item) == 1:  # flat vectors: a 1 x D gray strip each
        a = a.reshape(*batch, 1, 1, item[0])
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)


def _tile_grid(grid: np.ndarray, pad: int = 1, pad_value: float = _PAD_VALUE) -> np.ndarray:
    """(R, K, C, H, W) -> (R*(H+pad)+pad, K*(W+pad)+pad, C) mosaic with ``pad`` pixels between tiles."""
    R, K, C, H, W = grid.shape
    g = np.full((R, K, C, H + pad, W + pad), pad_value, dtype=np.float32)
    g[:, :, :, pad:, pad:] = grid  # each tile carries its top and left gap
    mosaic = g.transpose(2, 0, 3, 1, 4).reshape(C, R * (H + pad), K * (W + pad))
    mosaic = np.pad(mosaic, ((0, 0), (0, pad), (0, pad)), constant_values=pad_value)
    return mosaic.transpose(1, 2, 0)


def _rows_of(a: np.ndarray, nrow: int | None) -> np.ndarray:
    """(N, C, H, W) -> (rows, nrow, C, H, W), the unused tail filled with the gap colour."""
    n, C, H, W = a.shape
    if nrow is None:
        nrow = 1 if H == 1 else max(1, math.ceil(math.sqrt(n)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = max(1, math.ceil(n / nrow))
    full = np.full((rows * nrow, C, H, W), _PAD_VALUE, dtype=np.float32)
    full[:n] = a
    return full.reshape(rows, nrow, C, H, W)


def tile(images, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images into one (H', W', C) array, ``nrow`` images per row.

    ``nrow`` follows torchvision's ``make_grid``: the number of images in each
    row (default ceil(sqrt(N)), or 1 for flat vectors). Image k sits in tile row
    k // nrow, column k % nrow, with its top-left pixel at
    (pad + (k // nrow) * (H + pad), pad + (k % nrow) * (W + pad)).
    Unused tiles at the end are filled with the gap colour.
    """
    return _tile_grid(_rows_of(_as_images(images, lead=1), nrow), pad)


def _centres(count: int, size: int, pad: int = 1) -> list[float]:
    """Pixel coordinates of the tile centres along one axis of a mosaic."""
    return [pad + i * (size + pad) + (size - 1) / 2 for i in range(count)]


def _grid_figure(
    grid: np.ndarray,
    title: str | None,
    row_labels: Sequence[str | None] | None = None,
    col_labels: Sequence[str | None] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """Draw a (R, K, C, H, W) grid of images as a single imshow, with optional tick labels."""
    R, K, C, H, W = grid.shape
    mosaic = _tile_grid(grid)
    h_px, w_px = mosaic.shape[:2]
    flat = H == 1  # 1 x D strips: stretch vertically or they are invisible
    s = min(0.04, 9.0 / max(h_px, w_px))  # inches per mosaic pixel
    w_in = max(4.0, w_px * s + (1.8 if row_labels or ylabel else 0.3))
    h_in = (max(h_px * s, 0.25 * R) if flat else h_px * s) + (0.5 if col_labels or xlabel else 0.1)
    fig = Figure(figsize=(w_in, h_in), layout="constrained")
    ax = fig.add_subplot()
    pixels = mosaic[:, :, 0] if C == 1 else mosaic
    ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest",
              aspect="auto" if flat else "equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    for labels, centres, setter in ((row_labels, _centres(R, H), ax.set_yticks),
                                    (col_labels, _centres(K, W), ax.set_xticks)):
        if labels is not None:
            keep = [(c, lab) for c, lab in zip(centres, labels) if lab is not None]
            setter([c for c, _ in keep], [lab for _, lab in keep])
    ax.tick_params(length=0)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        wrapped = textwrap.fill(title, width=max(30, int(w_in * 11)))
        fig.set_figheight(h_in + 0.3 * (wrapped.count("\n") + 1))
        ax.set_title(wrapped, fontsize=11)
    return fig


def image_grid(images, nrow: int | None = None, title: str | None = None) -> Figure:
    """All images in one mosaic, ``nrow`` per row (see ``tile``); one imshow, fast for hundreds."""
    return _grid_figure(_rows_of(_as_images(images, lead=1), nrow), title)


def samples(images, title: str = "Decoded draws from the prior") -> Figure:
    """Decoded draws from the prior, tiled in a square-ish mosaic."""
    return image_grid(images, title=title)


def reconstructions(originals, recons, title: str = "Reconstructions") -> Figure:
    """Originals with their reconstructions directly below.

    Up to 16 pairs sit in one original row over one reconstruction row; more
    pairs wrap into further original/reconstruction row pairs.
    """
    x, r = _as_images(originals, lead=1), _as_images(recons, lead=1)
    if x.shape != r.shape:
        raise ValueError(f"originals {x.shape} and reconstructions {r.shape} must have the same shape")
    n, C, H, W = x.shape
    k = min(n, 16)
    blocks = math.ceil(n / k)
    grid = np.full((2 * blocks, k, C, H, W), _PAD_VALUE, dtype=np.float32)
    for b in range(blocks):  # rows 2b (originals) and 2b + 1 (reconstructions)
        chunk = slice(b * k, min(n, (b + 1) * k))
        grid[2 * b, : chunk.stop - chunk.start] = x[chunk]
        grid[2 * b + 1, : chunk.stop - chunk.start] = r[chunk]
    return _grid_figure(grid, title, row_labels=["original", "reconstruction"] * blocks)


def compare(originals, runs: Sequence[tuple[str, object, float | None]],
            title: str = "Reconstructions by run") -> Figure:
    """Top row the originals, then one row of reconstructions per run.

    ``runs`` holds (label, recons (N, C, H, W), test_elbo); test_elbo is the ELBO
    (a lower bound on log p(x), so usually negative) in nats, or None.
    """
    x = _as_images(originals, lead=1)
    rows, labels = [x], ["original"]
    for label, recons, elbo in runs:
        r = _as_images(recons, lead=1)
        if r.shape != x.shape:
            raise ValueError(f"run {label!r}: reconstructions {r.shape} do not match originals {x.shape}")
        rows.append(r)
        labels.append(label if elbo is None else f"{label}  ELBO {elbo:.1f} nats")
    return _grid_figure(np.stack(rows), title, row_labels=labels)


def rate_distortion(points: Sequence[tuple[str, float, float]],
                    title: str = "Rate against distortion, one point per run") -> Figure:
    """Each run's rate (KL(q(z|x) ‖ p(z)), nats) on x against its distortion (−E_q log p(x|z), nats).

    ``points`` holds (label, rate, distortion). Their sum is the run's −ELBO, so the dashed lines,
    of slope −1, join points of equal −ELBO: a run below another's line has the better ELBO, and
    where two runs sit on one line the ELBO cannot tell them apart, though one spends more nats on
    the code and reconstructs better (Alemi et al. 2018, "Fixing a Broken ELBO").
    """
    pts = [(str(label), float(r), float(d)) for label, r, d in points]
    if not pts:
        raise ValueError("rate_distortion needs at least one (label, rate, distortion) point")
    bad = [label for label, r, d in pts if not (math.isfinite(r) and math.isfinite(d))]
    if bad:
        raise ValueError(f"rate and distortion must be finite numbers; not so for {', '.join(bad)}")
    fig = Figure(figsize=(6.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    rates, dists = np.array([r for _, r, _ in pts]), np.array([d for _, _, d in pts])
    pad_r = max(np.ptp(rates), 1.0) * 0.15
    pad_d = max(np.ptp(dists), 1.0) * 0.15
    low = rates.min() - pad_r
    r_lim = (max(0.0, low) if rates.min() >= 0 else low, rates.max() + pad_r)  # a one-sample rate can dip below 0
    d_lim = (dists.min() - pad_d, dists.max() + pad_d)
    line = np.array(r_lim)
    cmap = colormaps["tab10" if len(pts) <= 10 else "tab20"]
    for i, (label, r, d) in enumerate(pts):
        colour = cmap(i % cmap.N)
        ax.plot(line, r + d - line, "--", color=colour, linewidth=0.8, alpha=0.6)
        ax.plot([r], [d], "osD^v"[i % 5], color=colour, label=f"{label}: −ELBO {r + d:.1f}")
    ax.set_xlim(*r_lim)
    ax.set_ylim(*d_lim)
    ax.set_xlabel("rate: KL(q(z|x) ‖ p(z)), nats per example")
    ax.set_ylabel("distortion: −E$_q$ log p(x|z), nats per example")
    ax.set_title(title)
    ax.legend(fontsize="small", title="dashed: equal −ELBO", title_fontsize="small")
    return fig


def manifold_z(n: int = 20, eps: float = 0.05) -> torch.Tensor:
    """(n*n, 2) latent points on a grid of Gaussian quantiles, for decoding into a manifold picture.

    Coordinates are Normal(0, 1).icdf(linspace(eps, 1 - eps, n)), as in Kingma &
    Welling (2013), Fig. 4. Point i*n + j is drawn at row i, column j: z1 grows
    left to right with j, z2 falls top to bottom with i (up is +z2, as on a plot).
    """
    if n < 1 or not 0.0 < eps < 0.5:
        raise ValueError(f"need n >= 1 and 0 < eps < 0.5, got n={n}, eps={eps}")
    # float64 so the grid is symmetric around 0 to float32 precision
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(eps, 1 - eps, n, dtype=torch.float64))
    z1 = q.repeat(n)                              # column j -> q[j]
    z2 = q.flip(0).repeat_interleave(n)           # row i -> q[n - 1 - i]
    return torch.stack([z1, z2], dim=1).to(torch.get_default_dtype())


def manifold(images, n: int, title: str = "Learned 2-D manifold (decoded Gaussian quantiles)",
             eps: float = 0.05) -> Figure:
    """Images decoded from ``manifold_z(n, eps)`` as an n x n picture, ticks showing z values."""
    a = _as_images(images, lead=1)
    if a.shape[0] != n * n:
        raise ValueError(f"expected n*n = {n * n} images decoded from manifold_z({n}), got {a.shape[0]}")
    z = manifold_z(n, eps).reshape(n, n, 2)
    labelled = _ticks(n)
    cols = [f"{v:.2f}" if j in labelled else None for j, v in enumerate(z[0, :, 0].tolist())]
    rows = [f"{v:.2f}" if i in labelled else None for i, v in enumerate(z[:, 0, 1].tolist())]
    return _grid_figure(a.reshape(n, n, *a.shape[1:]), title, row_labels=rows, col_labels=cols,
                        xlabel="$z_1$", ylabel="$z_2$")


def _ticks(n: int, most: int = 10) -> set[int]:
    """Which of n grid positions to label: about ``most``, every step-th from each end to the middle,
    so both ends are labelled and the labels lie symmetrically (a grid symmetric about 0 reads so)."""
    step = max(1, math.ceil(n / most))
    half = [i for i in range(0, n, step) if 2 * i <= n - 1]
    return set(half) | {n - 1 - i for i in half}


def interpolation_z(z_a: torch.Tensor, z_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """(steps, *z_a.shape): z = (1 - t) z_a + t z_b for t = linspace(0, 1, steps); endpoints exact."""
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a {tuple(z_a.shape)} and z_b {tuple(z_b.shape)} must have the same shape")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 to include both endpoints, got {steps}")
    t = torch.linspace(0.0, 1.0, steps, dtype=z_a.dtype, device=z_a.device).reshape(-1, *[1] * z_a.dim())
    return (1 - t) * z_a + t * z_b


def interpolations(strips, title: str = "Interpolations between pairs of images "
                   "(decoded along a line between the means of q(z|x))", originals=None) -> Figure:
    """strips (P, S, C, H, W): row p decodes S points from z_a (left) to z_b (right).

    originals (P, 2, C, H, W), if given: the two images of each pair, drawn at the row's ends."""
    a = _as_images(strips, lead=2)
    P, S = a.shape[:2]
    labelled = _ticks(S, 11)
    cols = [f"{t:.2g}" if j in labelled else None for j, t in enumerate(np.linspace(0.0, 1.0, S))]
    if originals is not None:
        o = _as_images(originals, lead=2)
        if o.shape != (P, 2, *a.shape[2:]):
            raise ValueError(f"expected the pairs' images shaped {(P, 2, *a.shape[2:])}, got {o.shape}")
        a = np.concatenate([o[:, :1], a, o[:, 1:]], axis=1)
        cols = ["image a", *cols, "image b"]
    return _grid_figure(a, title, row_labels=[f"pair {p + 1}" for p in range(P)], col_labels=cols,
                        xlabel="$t$ in $z = (1-t)\\,z_a + t\\,z_b$")


def latent_traversal(images, dims: Sequence[int], values, own=None, kl=None,
                     title: str = "Latent traversals: one dimension varied, the others fixed") -> Figure:
    """images (len(dims), len(values), C, H, W): row = latent dimension varied, column = its value.
    Rows are labelled z_1, z_2, …: dimension d (0-based) is z_{d+1}, as the scatter and the manifold
    name them.

    own (len(dims),), if given: the image's own value of each dimension, marked by a red triangle at
    the top of its row where that value falls between the columns' values (beyond them: on the end
    column, pointing outwards).
    kl (len(dims),), if given: each dimension's mean KL in nats, shown beside its name."""
    a = _as_images(images, lead=2)
    vals = [float(v) for v in values]
    if a.shape[:2] != (len(dims), len(vals)):
        raise ValueError(f"expected images shaped ({len(dims)}, {len(vals)}, C, H, W), got {a.shape}")
    for name, given in (("own", own), ("kl", kl)):
        if given is not None and len(given) != len(dims):
            raise ValueError(f"{name} needs one value per varied dimension ({len(dims)}), got {len(given)}")
    rows = [f"$z_{{{d + 1}}}$" + ("" if kl is None else f"  KL {float(kl[i]):.2f}") for i, d in enumerate(dims)]
    fig = _grid_figure(a, title, row_labels=rows,  # z_1 first, as on the other plots
                       col_labels=[f"{v:g}" for v in vals],
                       xlabel="value of the varied latent dimension", ylabel="latent dimension")
    if own is not None:
        ax = fig.axes[0]
        H, W = a.shape[-2:]
        xs, tops = _centres(len(vals), W), [c - (H - 1) / 2 for c in _centres(len(dims), H)]
        order = np.argsort(vals)
        along, at = np.asarray(vals)[order], np.asarray(xs)[order]  # np.interp needs increasing values
        for value, top in zip((float(v) for v in own), tops):
            x = float(np.interp(value, along, at))
            marker = "<" if value < min(vals) else ">" if value > max(vals) else "v"
            ax.plot([x], [top + H * 0.12], marker=marker, color="red", markersize=5, clip_on=False)
    return fig


def by_class(images, class_names: Sequence[str] | None = None,
             title: str = "Conditional samples: one row per class, the same z down each column") -> Figure:
    """images (C, K, ch, H, W): row c decodes K draws of z with label c."""
    a = _as_images(images, lead=2)
    names = class_names or [str(c) for c in range(a.shape[0])]
    return _grid_figure(a, title, row_labels=names, ylabel="class")


def _pca2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (N, D) onto its first two principal components -> ((N, 2), explained variance ratios (2,))."""
    xc = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # xc = U diag(s) Vh; rows of Vh are the PCs
    vh = vh[:2]
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))  # largest loading > 0:
    vh = vh * torch.where(signs == 0, 1.0, signs).to(vh.dtype)             # a deterministic sign
    total = (s**2).sum()
    ratio = (s[:2] ** 2) / total if total > 0 else torch.zeros_like(s[:2])
    proj = xc @ vh.T
    if proj.shape[1] < 2:  # fewer than 2 points: pad the missing component with zeros
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 2 - proj.shape[1])], dim=1)
        ratio = torch.cat([ratio, ratio.new_zeros(2 - ratio.shape[0])])
    return proj, ratio


def _colour_values(y, codes):
    """Colours for a continuous scatter: numeric labels as they are, other labels by class index."""
    if y is None:
        return "tab:blue"
    return y if np.issubdtype(y.dtype, np.number) else codes


def latent_scatter(means, labels=None, title: str | None = None,
                   class_names: Sequence[str] | None = None, box: float | None = None) -> Figure:
    """Means of q(z|x) (N, D): histogram for D = 1, scatter for D = 2, PCA to 2-D for D > 2.

    Integer labels colour the points; class_names[c], when given, names label c in the legend.
    box (D = 2 only): a dashed square of half-width ``box`` around 0, e.g. the manifold grid's extent."""
    m = torch.as_tensor(means.detach().cpu() if torch.is_tensor(means) else np.asarray(means),
                        dtype=torch.float64)
    if m.dim() != 2 or m.shape[1] < 1:
        raise ValueError(f"expected posterior means shaped (N, D), got {tuple(m.shape)}")
    n, d = m.shape
    y = None
    if labels is not None:
        y = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {y.shape}")
    fig = Figure(figsize=(6.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    classes, codes = np.unique(y, return_inverse=True) if y is not None else (None, None)
    discrete = classes is not None and len(classes) <= 20  # else a colorbar over the label codes
    cmap = colormaps["tab10" if discrete and len(classes) <= 10 else "tab20"]
    name = (lambda c: str(class_names[int(c)])) if class_names is not None else str

    if d == 1:
        x = m[:, 0].numpy()
        if discrete:
            ax.hist([x[y == c] for c in classes], bins=50, stacked=True,
                    color=[cmap(i) for i in range(len(classes))], label=[name(c) for c in classes])
        else:
            ax.hist(x, bins=50, color="tab:blue")
        ax.set_xlabel("$z_1$ (mean of q(z|x))")
        ax.set_ylabel("number of examples")
        default = "Means of q(z|x) in the 1-dim latent space"
    else:
        if d == 2:
            xy = m.numpy()
            ax.set_xlabel("$z_1$ (mean of q(z|x))")
            ax.set_ylabel("$z_2$ (mean of q(z|x))")
            default = "Latent space: means of q(z|x)"
            if box is not None:
                ax.plot([-box, box, box, -box, -box], [-box, -box, box, box, -box], "--", color="0.3",
                        linewidth=1, label=f"manifold grid (±{box:.2f})", zorder=3)
        else:
            proj, ratio = _pca2(m)
            xy = proj.numpy()
            ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
            ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
            default = f"PCA of the {d}-dim means of q(z|x)"
        size = 12 if n <= 2000 else 4
        if discrete:
            for i, c in enumerate(classes):
                pts = xy[y == c]
                ax.scatter(pts[:, 0], pts[:, 1], s=size, color=cmap(i), alpha=0.7, label=name(c),
                           linewidths=0, rasterized=True)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=_colour_values(y, codes),
                            cmap="viridis" if y is not None else None, alpha=0.7, linewidths=0,
                            rasterized=True)
            if y is not None:
                fig.colorbar(sc, ax=ax, label="label")
    if discrete or (box is not None and d == 2):
        ax.legend(title=None if not discrete else "label" if class_names is None else "class", loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False, markerscale=1.5 if d > 1 else 1.0)
    if title is None:
        title = default
    elif d > 2:  # a caller's title must not hide that this is a projection
        title = f"{title}\n({default})"
    ax.set_title(title)
    return fig


_PANELS = (  # (metric stem, panel title) — values are nats per example
    ("nelbo", "Negative ELBO (reconstruction + KL)"),
    ("recon", "Reconstruction $-\\mathbb{E}_q[\\log p(x|z)]$"),
    ("kl", "$\\mathrm{KL}(q(z|x)\\,\\|\\,p(z))$"),
)


def _loss_is_not_the_nelbo(record: dict) -> bool:
    loss, nelbo = record.get("train_loss"), record.get("train_nelbo")
    return loss is not None and nelbo is not None and abs(loss - nelbo) > 1e-6 * max(1.0, abs(nelbo))


def training_curves(records: list[dict], best_epoch: int | None = None, train_is_elbo: bool = True) -> Figure:
    """Negative ELBO, reconstruction and KL terms vs epoch, train and valid, from metrics.jsonl records.

    Train values are means over each epoch's steps (with the weights changing as they go), valid
    values are measured at the epoch's end. Where the loss trained on is not the −ELBO (β ≠ 1, a
    KL warm-up, free bits, IWAE), the first panel also shows it ("train loss"), and IWAE runs
    their validation −L_k, by which they choose the best epoch. best_epoch: marked by a dotted line.
    train_is_elbo=False (the poor man's norm penalty): the train curves are squared error and ‖z‖,
    not nats, and are left out; valid is the ELBO of the model sampling uses.

    Records without "epoch" are ignored; if an epoch appears twice (a resumed
    run), the later record wins. Panels with no data are left out.
    """
    by_epoch = {int(r["epoch"]): r for r in records if "epoch" in r}
    epochs = sorted(by_epoch)
    splits = (("train", "-", "train (mean over the epoch)"), ("valid", "--", "valid (at the epoch's end)"))
    if not train_is_elbo:
        splits = splits[1:]
    panels = [(stem, name) for stem, name in _PANELS
              if any(f"{split}_{stem}" in by_epoch[e] for e in epochs for split, _, _ in splits)]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.6), layout="constrained")
    fig.suptitle("Training curves (nats per example)")
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no per-epoch metrics recorded yet", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    marker = "o" if len(epochs) <= 30 else None

    def curve(ax, key, style, label):
        pts = [(e, by_epoch[e][key]) for e in epochs if key in by_epoch[e]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [math.nan if v is None else float(v) for v in ys], style, marker=marker, markersize=3,
                    label=label)

    for ax, (stem, name) in zip(axes, panels):
        for split, style, label in splits:
            curve(ax, f"{split}_{stem}", style, label)
        if stem == "nelbo":
            if train_is_elbo and any(_loss_is_not_the_nelbo(by_epoch[e]) for e in epochs):
                curve(ax, "train_loss", ":", "train loss (what was minimised)")
            curve(ax, "valid_iwae_loss", "-.", "valid $-\\mathcal{L}_k$")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1, label=f"best epoch ({best_epoch})"
                       if stem == "nelbo" else None)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    marker = "o" if len(epochs) <= 30 else None
    for ax, (stem, name) in zip(axes, panels):
        for split, style in (("train", "-"), ("valid", "--")):
            key = f"{split}_{stem}"
            pts = [(e, by_epoch[e][key]) for e in epochs if key in by_epoch[e]]
            if pts:
                xs, ys = zip(*pts)
                ys = [math.nan if v is None else float(v) for v in ys]
                ax.plot(xs, ys, style, marker=marker, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig
