"""Tests for vaekit.plots (figures from tensors) and vaekit.report (HTML pages)."""

import io
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from vaekit import plots, report

# (C, H, W) image shapes, none of them 28 x 28; (D,) is a flat vector
SHAPES = [(1, 20, 12), (3, 8, 8), (5,)]


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def render(fig) -> bytes:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    data = buf.getvalue()
    assert data.startswith(b"\x89PNG")
    return data


def all_text(fig) -> str:
    """Every title, axis label, tick label and legend text on the figure, joined."""
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return "\n".join(t for t in texts if t)


# ---------------------------------------------------------------- every plot renders


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_image_plots_render_for_any_image_shape(shape):
    x = rand(6, *shape)
    render(plots.image_grid(x, title="grid"))
    render(plots.image_grid(x.numpy(), nrow=4))  # numpy input, ragged last row
    render(plots.samples(x))
    render(plots.reconstructions(x, rand(6, *shape, seed=1)))
    render(plots.compare(x, [("latent 2", rand(6, *shape, seed=2), -101.25), ("latent 5", x, None)]))
    render(plots.manifold(rand(9, *shape), n=3))
    render(plots.interpolations(rand(2, 5, *shape)))
    render(plots.latent_traversal(rand(3, 4, *shape), dims=[0, 2, 7], values=[-2.0, -1.0, 1.0, 2.0]))


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("labels", ["none", "classes", "continuous"])
def test_latent_scatter_renders(d, labels):
    means = torch.randn(200, d, generator=torch.Generator().manual_seed(0))
    y = {"none": None, "classes": torch.arange(200) % 10, "continuous": torch.linspace(0, 1, 200)}[labels]
    render(plots.latent_scatter(means, y))


def test_uint8_images_are_scaled_and_out_of_range_values_clipped():
    x = (rand(4, 3, 5, 5) * 255).to(torch.uint8)
    tiled = plots.tile(x, nrow=4)
    assert tiled.max() <= 1.0
    # the first image, inside its 1-pixel border, is the uint8 values over 255
    np.testing.assert_allclose(tiled[1:6, 1:6], x[0].permute(1, 2, 0).numpy() / 255, atol=1e-6)
    t = plots.tile(torch.full((1, 1, 2, 2), 3.0), nrow=1)
    assert t.max() == 1.0


def test_bad_shapes_are_refused_with_the_shape_in_the_message():
    with pytest.raises(ValueError, match=r"\(4, 2, 5, 5\)"):
        plots.image_grid(torch.zeros(4, 2, 5, 5))  # C = 2 is neither gray nor RGB
    with pytest.raises(ValueError, match="same shape"):
        plots.reconstructions(torch.zeros(4, 1, 5, 5), torch.zeros(4, 1, 5, 6))
    with pytest.raises(ValueError, match="n\\*n = 9"):
        plots.manifold(torch.zeros(8, 1, 5, 5), n=3)


def test_plots_do_not_touch_pyplot():
    code = (
        "import sys, io, torch; from vaekit import plots; "
        "plots.image_grid(torch.rand(4, 1, 5, 5)).savefig(io.BytesIO(), format='png'); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(plots.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------- tile


def test_tile_puts_image_k_at_row_k_div_nrow_column_k_mod_nrow():
    n, C, H, W, nrow, pad = 7, 3, 4, 5, 3, 1
    x = torch.stack([torch.full((C, H, W), (k + 1) / 10) for k in range(n)])
    x[:, :, 0, 0] = 0.99  # mark each tile's top-left pixel
    t = plots.tile(x, nrow=nrow)
    rows = -(-n // nrow)
    assert t.shape == (rows * (H + pad) + pad, nrow * (W + pad) + pad, C)
    for k in range(n):
        top, left = pad + (k // nrow) * (H + pad), pad + (k % nrow) * (W + pad)
        block = t[top : top + H, left : left + W]
        np.testing.assert_array_equal(block.transpose(2, 0, 1), x[k].numpy())
    # gaps and the two unused tiles hold the gap colour, not image pixels
    assert np.all(t[0, :, :] == t[0, 0, 0]) and np.all(t[:, 0, :] == t[0, 0, 0])
    assert np.all(t[-H - pad :, -2 * (W + pad) :] == t[0, 0, 0])


def test_tile_default_is_square_and_flat_vectors_are_one_per_row():
    # ceil(sqrt(10)) = 4 per row -> 3 rows of 2-pixel tiles with 1-pixel gaps
    assert plots.tile(torch.zeros(10, 1, 2, 2)).shape[:2] == (3 * 3 + 1, 4 * 3 + 1)
    t = plots.tile(rand(3, 6))
    assert t.shape == (3 * 2 + 1, 6 + 2, 1)
    np.testing.assert_array_equal(t[3, 1:7, 0], rand(3, 6)[1].numpy())


# ---------------------------------------------------------------- manifold


def test_manifold_z_quantiles_symmetry_and_order():
    n, eps = 7, 0.05
    z = plots.manifold_z(n, eps)
    assert z.shape == (n * n, 2) and z.dtype == torch.get_default_dtype()
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = normal.icdf(torch.tensor(eps)), normal.icdf(torch.tensor(1 - eps))
    grid = z.reshape(n, n, 2)  # [row i, column j]
    z1, z2 = grid[..., 0], grid[..., 1]
    # z1 depends on the column only and increases; z2 on the row only and decreases downwards
    assert torch.equal(z1, z1[:1].expand(n, n)) and torch.equal(z2, z2[:, :1].expand(n, n))
    assert torch.all(z1[0].diff() > 0) and torch.all(z2[:, 0].diff() < 0)
    torch.testing.assert_close(z1[0, 0], lo)
    torch.testing.assert_close(z1[0, -1], hi)
    torch.testing.assert_close(z2[0, 0], hi)  # top-left is (z1 low, z2 high)
    torch.testing.assert_close(z2[-1, 0], lo)
    values = z1[0]
    torch.testing.assert_close(values, -values.flip(0), atol=1e-6, rtol=0)  # symmetric around 0
    assert abs(values[n // 2]) < 1e-6
    torch.testing.assert_close(values, normal.icdf(torch.linspace(eps, 1 - eps, n)), atol=1e-5, rtol=0)


def test_manifold_ticks_label_both_ends_of_a_large_grid():
    fig = plots.manifold(rand(400, 1, 6, 6), n=20)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "-1.64" and labels[-1] == "1.64" and 8 <= len(labels) <= 11
    assert labels == [label.lstrip("-") if label.startswith("-") else "-" + label for label in labels[::-1]]


def test_manifold_ticks_show_the_z_values():
    fig = plots.manifold(rand(16, 1, 6, 6), n=4)
    ax = fig.axes[0]
    z = plots.manifold_z(4)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{v:.2f}" for v in z[:4, 0].tolist()]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{v:.2f}" for v in z[::4, 1].tolist()]


# ---------------------------------------------------------------- interpolation


def test_interpolation_z_endpoints_exact_and_midpoint_is_average():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    z = plots.interpolation_z(a, b, steps=11)
    assert z.shape == (11, 6)
    assert torch.equal(z[0], a) and torch.equal(z[-1], b)
    torch.testing.assert_close(z[5], (a + b) / 2)
    torch.testing.assert_close(z.diff(dim=0), ((b - a) / 10).expand(10, 6))  # evenly spaced on the line
    with pytest.raises(ValueError):
        plots.interpolation_z(a, b, steps=1)


# ---------------------------------------------------------------- latent scatter


def test_latent_scatter_says_pca_only_when_it_projects():
    g = torch.Generator().manual_seed(0)
    five = all_text(plots.latent_scatter(torch.randn(100, 5, generator=g)))
    two = all_text(plots.latent_scatter(torch.randn(100, 2, generator=g)))
    assert "PCA of the 5-dim means of q(z|x)" in five and "PC1 (" in five and "PC2 (" in five
    assert "% of variance" in five
    assert "PCA" not in two and "PC1" not in two
    titled = all_text(plots.latent_scatter(torch.randn(100, 5, generator=g), title="My run"))
    assert "My run" in titled and "PCA" in titled  # a custom title does not hide the projection


def test_pca_of_points_on_a_line_in_5d_explains_everything_with_pc1():
    t = torch.linspace(-2, 3, 50)
    direction = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    means = t[:, None] * direction + torch.tensor([4.0, 0.0, -1.0, 2.0, 0.5])
    fig = plots.latent_scatter(means)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "PC1 (100.0% of variance)"
    assert ax.get_ylabel() == "PC2 (0.0% of variance)"
    xy = ax.collections[0].get_offsets()
    expected = (t - t.mean()) * direction.norm()  # signed distance along the line from the centre
    sign = np.sign(xy[0, 0] * expected[0].item())
    np.testing.assert_allclose(xy[:, 0], sign * expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(xy[:, 1], 0.0, atol=1e-4)


def test_pca_matches_numpy_eigendecomposition_of_the_covariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    proj, ratio = plots._pca2(x.double())
    xc = x.double().numpy() - x.double().numpy().mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc, rowvar=False))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    np.testing.assert_allclose(ratio.numpy(), evals[:2] / evals.sum(), rtol=1e-10)
    ref = xc @ evecs[:, :2]
    for k in range(2):  # equal up to the sign of each component
        assert np.allclose(proj[:, k].numpy(), ref[:, k]) or np.allclose(proj[:, k].numpy(), -ref[:, k])


def test_latent_scatter_legend_lists_the_classes():
    means = torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    fig = plots.latent_scatter(means, labels=np.arange(60) % 3)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2"]
    named = plots.latent_scatter(means, labels=np.arange(60) % 3, class_names=["cat", "dog", "owl"])
    assert [t.get_text() for t in named.axes[0].get_legend().get_texts()] == ["cat", "dog", "owl"]


# ---------------------------------------------------------------- labelled rows


def test_compare_labels_each_run_with_its_elbo():
    x = rand(3, 1, 6, 6)
    fig = plots.compare(x, [("latent 2", x, -123.456), ("latent 20", x, -95.04)])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["original", "latent 2  ELBO -123.5 nats", "latent 20  ELBO -95.0 nats"]


def test_traversal_marks_the_images_own_values_and_names_each_rows_kl():
    values = [-3.0, -1.5, 0.0, 1.5, 3.0]
    fig = plots.latent_traversal(rand(3, 5, 1, 4, 4), dims=[4, 0, 2], values=values, own=[1.5, -5.0, 0.75],
                                 kl=[2.5, 0.013, 1.0])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["$z_{5}$  KL 2.50", "$z_{1}$  KL 0.01", "$z_{3}$  KL 1.00"]
    cols = [t.get_position()[0] for t in ax.get_xticklabels()]  # the column centres
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-3", "-1.5", "0", "1.5", "3"]
    marks = ax.get_lines()
    assert [m.get_marker() for m in marks] == ["v", "<", "v"]  # -5 lies left of the range
    assert marks[0].get_xdata()[0] == cols[3] and marks[1].get_xdata()[0] == cols[0]
    assert marks[2].get_xdata()[0] == (cols[2] + cols[3]) / 2  # 0.75 is halfway from 0 to 1.5
    rows = [t.get_position()[1] for t in ax.get_yticklabels()]
    assert all(abs(m.get_ydata()[0] - r) < 2 for m, r in zip(marks, rows))  # each mark on its own row
    render(fig)
    with pytest.raises(ValueError, match="own needs one value per varied dimension"):
        plots.latent_traversal(rand(3, 5, 1, 4, 4), dims=[4, 0, 2], values=values, own=[1.0])


def test_interpolations_put_each_pairs_images_at_the_ends():
    strips, pairs = torch.full((2, 4, 1, 3, 3), 0.5), torch.stack([torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)], 1)
    fig = plots.interpolations(strips, originals=pairs)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "image a" and labels[-1] == "image b" and len(labels) == 6
    mosaic = np.asarray(ax.get_images()[0].get_array())
    assert (mosaic[1:4, 1:4] == 0).all() and (mosaic[1:4, -4:-1] == 1).all()  # row 1: a left, b right
    assert (mosaic[1:4, 5:8] == 0.5).all()
    with pytest.raises(ValueError, match="pairs' images"):
        plots.interpolations(strips, originals=pairs[:, :1])


def test_latent_scatter_draws_the_manifold_square_in_2d():
    fig = plots.latent_scatter(torch.randn(50, 2), torch.arange(50) % 3, box=1.64)
    (square,) = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert sorted(set(square.get_xdata())) == [-1.64, 1.64] and sorted(set(square.get_ydata())) == [-1.64, 1.64]
    assert "manifold grid (±1.64)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_rate_distortion_puts_each_run_at_its_kl_and_recon_on_its_line_of_equal_elbo():
    fig = plots.rate_distortion([("z=2", 6.5, 140.0), ("z=20", 25.0, 78.0)])
    ax = fig.axes[0]
    lines = ax.get_lines()  # per run: its line of equal −ELBO, then its point
    for (line, point), (rate, dist) in zip(zip(lines[::2], lines[1::2]), [(6.5, 140.0), (25.0, 78.0)]):
        assert (point.get_xdata()[0], point.get_ydata()[0]) == (rate, dist)
        xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        np.testing.assert_allclose(xs + ys, rate + dist)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["z=2: −ELBO 146.5", "z=20: −ELBO 103.0"]
    (r0, r1), (d0, d1) = ax.get_xlim(), ax.get_ylim()
    assert 0 <= r0 < 6.5 and r1 > 25 and d0 < 78 and d1 > 140  # every point inside, no negative rates
    render(fig)
    # a rate estimated from one sample can be just below 0: the axis then shows it
    assert plots.rate_distortion([("mlp2", -0.2, 90.0)]).axes[0].get_xlim()[0] < -0.2


def test_rate_distortion_refuses_no_points_and_non_finite_ones():
    with pytest.raises(ValueError, match="at least one"):
        plots.rate_distortion([])
    with pytest.raises(ValueError, match="not so for bad"):
        plots.rate_distortion([("ok", 1.0, 2.0), ("bad", float("nan"), 2.0)])


def test_reconstructions_put_originals_above_their_reconstructions():
    x, r = torch.zeros(20, 1, 3, 3), torch.ones(20, 1, 3, 3)
    fig = plots.reconstructions(x, r)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["original", "reconstruction"] * 2
    pixels = fig.axes[0].images[0].get_array()
    assert pixels[1:4, 1:4].max() == 0.0 and pixels[5:8, 1:4].min() == 1.0  # row 0 originals, row 1 recons


# ---------------------------------------------------------------- training curves


def test_training_curves_skip_missing_keys_and_records_without_epoch():
    records = [
        {"epoch": 1, "train_nelbo": 120.0, "valid_nelbo": 125.0, "train_kl": 10.0},
        {"step": 500, "loss": 3.0},  # no epoch: ignored
        {"epoch": 2, "train_nelbo": 110.0, "valid_nelbo": 116.0, "train_kl": 12.0},
        {"epoch": 2, "train_nelbo": 109.0, "valid_nelbo": 115.0, "train_kl": 12.5},  # resumed: later wins
    ]
    fig = plots.training_curves(records)
    render(fig)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 and titles[0].startswith("Negative ELBO") and "KL" in titles[1]  # no recon panel
    nelbo = {line.get_label().split()[0]: line for line in fig.axes[0].get_lines()}
    assert list(nelbo["train"].get_xdata()) == [1, 2] and list(nelbo["train"].get_ydata()) == [120.0, 109.0]
    assert list(nelbo["valid"].get_ydata()) == [125.0, 115.0]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["train (mean over the epoch)"]
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() == "nats per example" for ax in fig.axes)


def test_training_curves_show_the_loss_where_it_is_not_the_nelbo_and_mark_the_best_epoch():
    iwae = [{"epoch": e, "train_nelbo": 100.0 - e, "train_loss": 95.0 - e, "valid_nelbo": 101.0 - e,
             "valid_iwae_loss": 96.0 - e} for e in (1, 2, 3)]
    fig = plots.training_curves(iwae, best_epoch=2)
    render(fig)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["train loss (what was minimised)"].get_ydata()) == [94.0, 93.0, 92.0]
    assert list(lines["valid $-\\mathcal{L}_k$"].get_ydata()) == [95.0, 94.0, 93.0]
    assert list(lines["best epoch (2)"].get_xdata()) == [2, 2]
    plain = [{**r, "train_loss": r["train_nelbo"]} for r in iwae[:1]]
    assert not any("loss" in line.get_label() for line in plots.training_curves(plain).axes[0].get_lines())
    # the poor man's norm penalty: the train numbers are not nats, so only valid is drawn
    norm = plots.training_curves(iwae, train_is_elbo=False)
    assert all(line.get_label().startswith("valid") for ax in norm.axes for line in ax.get_lines())


def test_training_curves_with_no_epoch_metrics_still_render():
    render(plots.training_curves([]))
    render(plots.training_curves([{"step": 1, "loss": 2.0}]))


# ---------------------------------------------------------------- HTML reports


class StrictParser(HTMLParser):
    """Collects img srcs, links and text; fails on mismatched tags."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.srcs, self.hrefs, self.text, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> StrictParser:
    p = StrictParser()
    p.feed(page)
    p.close()
    assert p.stack == [], f"unclosed tags: {p.stack}"
    assert page.startswith("<!DOCTYPE html>")
    assert "script" not in p.tags and "<link" not in page and "http" not in page  # self-contained
    return p


EVIL = "Run <script>alert('x')</script> & co"
SUMMARY = {"test": {"elbo": -95.123456, "recon": 70.5, "kl": 24.62345}, "best_epoch": 17,
           "train_seconds": 12345.67, "latent_dim": 2}


def test_run_report_has_figures_escaped_title_numbers_config_and_metrics():
    figures = [("Reconstructions", "recon.png"), ("Samples from the prior", "figs/samples.png")]
    config = {"model": {"name": "mlp", "latent_dim": 2, "hidden": [512, 256]}, "lr": 0.001}
    metrics = [{"epoch": e, "train_nelbo": 100.0 + e} for e in range(1, 15)]
    page = report.run_report(EVIL, config, SUMMARY, figures, metrics)
    p = parse(page)
    assert p.srcs == ["recon.png", "figs/samples.png"]
    assert "<script>" not in page and "&lt;script&gt;" in page
    text = "".join(p.text)
    assert EVIL in text  # escaped in the source, the same text once parsed
    for number in ("-95.12", "70.5", "24.62", "17", "12346"):
        assert number in text
    assert "Test ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)) = -70.50 − 24.62 = -95.12 nats per image" in text
    assert "test.elbo" in text and "model.latent_dim" in text and "[512, 256]" in text
    assert "Reconstructions" in text and "Samples from the prior" in text
    assert "last 10 of 14" in text and "114" in text and "104" not in text  # only the last rows


def test_run_report_without_metrics_and_odd_filenames():
    page = report.run_report("r", {}, {}, [("a & b", "my fig.png")])
    p = parse(page)
    assert p.srcs == ["my%20fig.png"] and "a & b" in "".join(p.text)
    with pytest.raises(ValueError, match="relative"):
        report.run_report("r", {}, {}, [("abs", "/tmp/x.png")])


def test_index_report_links_runs_and_tabulates_numeric_keys():
    runs = [
        ("latent <2>", "z2/report.html", {"latent_dim": 2, "test": {"elbo": -140.1234}, "model": "mlp"}),
        ("latent 20", "z20/report.html", {"latent_dim": 20, "test": {"elbo": -95.5, "kl": 25.0}}),
    ]
    page = report.index_report(EVIL, runs, [("Comparison", "compare.png")], intro="Latent sizes <2 & 20>")
    p = parse(page)
    assert p.hrefs == ["z2/report.html", "z20/report.html"] and p.srcs == ["compare.png"]
    text = "".join(p.text)
    assert EVIL in text and "latent <2>" in text and "Latent sizes <2 & 20>" in text
    assert "<script>" not in page
    for piece in ("latent_dim", "test.elbo", "test.kl", "-140.1", "-95.5", "25", "—"):
        assert piece in text
    assert "model" not in text.split("Runs", 1)[1].split("Comparison")[0]  # non-numeric keys are not columns


def test_format_value():
    f = report.format_value
    assert [f(-95.123456), f(0.0), f(12345.67), f(1.5e-6), f(3), f(True), f(None), f(float("nan"))] == [
        "-95.12", "0", "12346", "1.5e-06", "3", "true", "—", "nan"]
