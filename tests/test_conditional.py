"""The conditional VAE: q(z|x, y) and p(x|z, y), from the model through training, sampling and the CLI."""

import json

import numpy as np
import pytest
import torch

from vaekit import generate, plots, runs
from vaekit.cli import main
from vaekit.config import ModelConfig, RunConfig
from vaekit.errors import ConfigError
from vaekit.models import build
from vaekit.objectives import decode, elbo, norm_penalty

SHAPE = (1, 6, 6)


def templates() -> torch.Tensor:
    """Three classes of 6×6 binary images: top rows, bottom rows, left columns."""
    t = torch.zeros(3, *SHAPE)
    t[0, :, :2] = 1
    t[1, :, 4:] = 1
    t[2, :, :, :2] = 1
    return t


def noisy_class_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    flips = torch.rand(n, *SHAPE, generator=g) < 0.05
    return (templates()[y] + flips).remainder(2), y


def cvae(seed: int = 0, latent_dim: int = 2):
    return build(ModelConfig(hidden=(32,), latent_dim=latent_dim, n_classes=3, input_shape=SHAPE), seed=seed)


def test_the_label_changes_what_is_decoded():
    model = cvae()
    z = torch.randn(4, 2)
    a = decode(model, z, torch.zeros(4, dtype=torch.long)).mean
    b = decode(model, z, torch.ones(4, dtype=torch.long)).mean
    assert not torch.allclose(a, b)


def test_labels_are_shared_by_the_k_samples_of_one_image():
    model = cvae()
    x, y = noisy_class_data(5)
    z = torch.randn(7, 5, 2)  # (k, B, D)
    together = decode(model, z, y).log_prob(x)
    one_by_one = torch.stack([decode(model, z[i], y).log_prob(x) for i in range(7)])
    torch.testing.assert_close(together, one_by_one)



def test_the_norm_penalty_of_a_conditional_model_decodes_with_the_label():
    model = cvae()
    x, y = noisy_class_data(6)
    torch.manual_seed(0)
    right = norm_penalty(model, x, y=y)
    torch.manual_seed(0)  # the same noise on the code; only the label differs
    wrong = norm_penalty(model, x, y=(y + 1) % 3)
    assert not torch.allclose(right.distortion, wrong.distortion)
    right.loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_trained_cvae_draws_the_class_it_is_asked_for():
    torch.manual_seed(0)
    model = cvae()
    x, y = noisy_class_data(600)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        idx = torch.randint(0, 600, (64,))
        loss = elbo(model, x[idx], y=y[idx]).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = templates().flatten(1)
    for c in range(3):
        drawn = generate.sample(model, 50, seed=c, label=c).flatten(1).mean(0)  # (36,) mean pixel probabilities
        distances = (t - drawn).abs().mean(1)  # to each class template
        assert distances.argmin() == c and distances[c] < 0.15, (c, distances)


def test_by_class_rows_share_z_and_differ_by_label():
    model = cvae()
    grid = generate.by_class(model, per_class=4, seed=0)
    assert grid.shape == (3, 4, *SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = model.prior().sample((4,))  # the draw by_class makes with seed 0
    with torch.no_grad():
        for c in range(3):  # row c: the same four codes, decoded with label c
            torch.testing.assert_close(grid[c], decode(model, z, torch.full((4,), c)).mean)
    assert not torch.allclose(grid[0], grid[1])
    assert not torch.equal(generate.by_class(model, per_class=4, seed=1), grid)  # another seed, other codes
    # a chosen few classes: those rows of the full grid, in the order asked
    torch.testing.assert_close(generate.by_class(model, per_class=4, seed=0, classes=[2, 0]), grid[[2, 0]])
    for bad in ([3], [-1], []):
        with pytest.raises(ConfigError, match="between 0 and 2"):
            generate.by_class(model, classes=bad)


def test_many_classes_get_evenly_spaced_rows_named_by_their_labels():
    from vaekit import figures

    assert figures.shown_classes(3) == [0, 1, 2]
    rows = figures.shown_classes(1000)
    assert len(rows) == figures.N_CLASS_ROWS and rows[0] == 0 and rows[-1] == 999
    assert all(0 < b - a <= 53 for a, b in zip(rows, rows[1:]))  # 999 / 19 ≈ 52.6 apart
    model = build(ModelConfig(hidden=(8,), latent_dim=2, n_classes=45, input_shape=SHAPE), seed=0)
    names = [f"c{i}" for i in range(45)]
    fig = figures.run_figures(model, torch.rand(6, *SHAPE), torch.arange(6), [], class_names=names)["classes.png"]
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert shown == [names[c] for c in figures.shown_classes(45)]
    caption = figures.captions(model.cfg, "test")["classes.png"]
    assert "20 of the 45 classes" in caption


def test_misuse_is_a_clear_error():
    model = cvae()
    x, y = noisy_class_data(4)
    with pytest.raises(ConfigError, match="conditional model"):
        model.encode(x)
    with pytest.raises(ConfigError, match="0..2"):
        model.encode(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match="whole class numbers"):
        model.encode(x, torch.tensor([0.0, 1.7, 2.0, 1.0]))  # .long() would quietly make 1.7 class 1
    with pytest.raises(ConfigError, match="not conditional"):
        generate.sample(build(ModelConfig(hidden=(8,), latent_dim=2, input_shape=SHAPE)), 2, label=1)
    with pytest.raises(ConfigError, match="out of range"):
        generate.sample(model, 2, label=5)
    with pytest.raises(ConfigError, match="needs arch mlp or conv"):
        RunConfig.from_dict({"model": {"arch": "mlp2", "n_classes": 10}})


def test_save_load_round_trip_keeps_the_conditioning(tmp_path):
    model = cvae(seed=3)
    runs.save_config(tmp_path, RunConfig(model=model.cfg))
    runs.save_weights(tmp_path / "model.safetensors", model)
    again = runs.load(tmp_path)
    x, y = noisy_class_data(8)
    assert torch.equal(generate.reconstruct(model.eval(), x, y), generate.reconstruct(again, x, y))
    assert torch.equal(generate.sample(model, 6, seed=2, label=2), generate.sample(again, 6, seed=2, label=2))


@pytest.fixture
def labelled_npz(tmp_path):
    x, y = noisy_class_data(400)
    path = tmp_path / "three.npz"
    np.savez(path, x=(x.squeeze(1).numpy() * 255).astype(np.uint8), y=y.numpy())
    return path


def test_cli_conditional_run_samples_a_chosen_label(labelled_npz, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(labelled_npz), "--conditional", "--latent-dim", "2",
                 "--hidden", "32", "--epochs", "2", "--batch-size", "50", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["n_classes"] == 3
    assert (run / "classes.png").is_file()
    assert "classes.png" in (run / "report.html").read_text()
    assert main(["sample", str(run), "--label", "2", "--n", "9", "--out", str(tmp_path / "two.png")]) == 0
    assert main(["sample", str(run), "--label", "0", "--n", "9", "--out", str(tmp_path / "zero.png")]) == 0
    # the same seed, so the same codes: only the label differs, and so do the images
    assert (tmp_path / "two.png").read_bytes() != (tmp_path / "zero.png").read_bytes()
    expected = tmp_path / "expected.png"
    plots.samples(generate.sample(runs.load(run), 9, seed=0, label=2)).savefig(expected, dpi=110,
                                                                              bbox_inches="tight", format="png")
    assert (tmp_path / "two.png").read_bytes() == expected.read_bytes()
    assert main(["sample", str(run), "--label", "7"]) == 2
    capsys.readouterr()
    assert main(["sample", str(run), "--label", "99999999999999999999"]) == 2  # no integer overflow
    assert "give a class number 0..2" in capsys.readouterr().err
    assert main(["sample", str(run), "--label", "two"]) == 2  # this data names no classes
    assert main(["eval", str(run), "--k", "5", "--split", "valid", "--json", "--no-progress"]) == 0
    assert "p(x|y)" in json.loads((run / "summary.json").read_text())["valid_eval"]["note"]


def test_cli_conditional_sample_takes_the_class_names_of_an_image_folder(tmp_path, capsys):
    from PIL import Image

    x, y = noisy_class_data(300)
    names = ["top", "bottom", "left"]  # subfolders sort as bottom = 0, left = 1, top = 2
    for i, (img, label) in enumerate(zip(x, y)):
        folder = tmp_path / "shapes" / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(tmp_path / "shapes"), "--conditional", "--latent-dim",
                 "2", "--hidden", "32", "--epochs", "1", "--batch-size", "50", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["class_names"] == ["bottom", "left", "top"]
    # The cvae preset's 10 classes are MNIST's: on this folder it counts the folder's 3 as --conditional does.
    preset_run = tmp_path / "preset_run"
    assert main(["train", "--out", str(preset_run), "--data", str(tmp_path / "shapes"), "--preset", "cvae",
                 "--epochs", "1", "--batch-size", "50", "--no-progress"]) == 0
    model_cfg = json.loads((preset_run / "config.json").read_text())["model"]
    assert (model_cfg["n_classes"], model_cfg["class_names"]) == (3, ["bottom", "left", "top"])
    by_name, by_number = tmp_path / "top.png", tmp_path / "2.png"
    assert main(["sample", str(run), "--label", "top", "--n", "4", "--out", str(by_name)]) == 0
    assert main(["sample", str(run), "--label", "2", "--n", "4", "--out", str(by_number)]) == 0
    assert by_name.read_bytes() == by_number.read_bytes()
    capsys.readouterr()
    assert main(["sample", str(run), "--label", "right", "--out", str(tmp_path / "right.png")]) == 2
    assert "one of its classes' names: bottom, left, top" in capsys.readouterr().err
    assert not (tmp_path / "right.png").exists()
    assert main(["encode", str(run), "--out", str(tmp_path / "codes.npz")]) == 0
    codes = np.load(tmp_path / "codes.npz")
    assert codes["classes"].tolist() == ["bottom", "left", "top"] and set(codes["y"].tolist()) <= {0, 1, 2}

    # other data in class subfolders is matched to the model's classes by name, not by its own order
    (tmp_path / "shapes" / "bottom").rename(tmp_path / "aside")  # left, top: its own labels 0, 1
    assert main(["encode", str(run), "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "new.npz")]) == 0
    new = np.load(tmp_path / "new.npz")
    assert set(new["y"].tolist()) == {1, 2} and new["classes"].tolist() == ["bottom", "left", "top"]
    from vaekit.data import load_path
    from vaekit.train import eval_set

    cfg = runs.load_config(run)
    x = eval_set(load_path(tmp_path / "shapes"), cfg.data)  # its own labels: left 0, top 1
    model = runs.load(run)
    for model_label in (1, 2):
        rows = torch.from_numpy(new["y"] == model_label)
        np.testing.assert_allclose(new["z"][rows.numpy()], generate.encode_mean(
            model, x[rows], y=torch.full((int(rows.sum()),), model_label)).numpy(), rtol=1e-6, atol=1e-6)
    wrong = generate.encode_mean(model, x[torch.from_numpy(new["y"] == 1)], y=torch.zeros(int((new["y"] == 1).sum()),
                                                                                          dtype=torch.long))
    assert not np.allclose(new["z"][new["y"] == 1], wrong.numpy(), atol=1e-3)  # numbered by the folder: other codes
    (tmp_path / "shapes" / "right").mkdir()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "shapes" / "right" / "0.png")
    capsys.readouterr()
    assert main(["encode", str(run), "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "no.npz")]) == 2
    assert "subfolders right are none of this model's classes (bottom, left, top)" in capsys.readouterr().err
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((4, 6, 6), np.uint8))
    assert main(["eval", str(run), "--data", str(tmp_path / "unlabelled.npz"), "--k", "2"]) == 2
    assert "has no labels, and this conditional model" in capsys.readouterr().err


def test_a_label_is_a_class_name_first_then_a_number():
    from vaekit.cli import _class_number

    named = ModelConfig(n_classes=3, class_names=("1", "2", "3"))  # subfolders named by numbers
    assert [_class_number(named, s) for s in ("1", "2", "3", "0")] == [0, 1, 2, 0]
    assert _class_number(ModelConfig(n_classes=3), "2") == 2
    with pytest.raises(ConfigError, match="records no class names"):
        _class_number(ModelConfig(n_classes=3), "cat")
    assert _class_number(ModelConfig(), "cat") == "cat"  # generate.sample refuses it: the model takes no label


def test_class_names_must_fit_the_classes():
    with pytest.raises(ConfigError, match="3 names for n_classes = 2"):
        ModelConfig(n_classes=2, class_names=("a", "b", "c")).check()
    with pytest.raises(ConfigError, match="differ"):
        ModelConfig(n_classes=2, class_names=("a", "a")).check()
    assert RunConfig.from_dict({"model": {"n_classes": 2, "class_names": ["a", "b"]}}).model.class_names == ("a", "b")


def test_cli_conditional_without_labels_writes_nothing(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=(noisy_class_data(100)[0].squeeze(1).numpy() * 255).astype(np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", str(path), "--conditional", "--epochs", "1",
                 "--no-progress"]) == 2
    assert not run.exists()


def test_labels_out_of_range_for_a_conditional_model_say_what_to_do():
    from vaekit.data import Dataset
    from vaekit.errors import DataError
    from vaekit.train import labels_for

    cfg = ModelConfig(hidden=(32,), latent_dim=2, n_classes=3, input_shape=SHAPE)
    x = torch.zeros(4, *SHAPE)
    with pytest.raises(DataError, match="numbered from 0"):
        labels_for(Dataset(x, torch.tensor([-1, 0, 1, 0]), "d"), cfg)
    with pytest.raises(DataError, match="model.n_classes=4"):
        labels_for(Dataset(x, torch.tensor([0, 3, 1, 0]), "d"), cfg)
    assert labels_for(Dataset(x, torch.tensor([0, 2, 1, 0]), "d"), cfg).tolist() == [0, 2, 1, 0]
