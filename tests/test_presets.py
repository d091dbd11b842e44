"""Every preset trains from the CLI for one epoch."""

import json

import numpy as np
import pytest

from vaekit.cli import main
from vaekit.config import PRESETS


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory):
    """2000 MNIST-shaped 28×28 uint8 images of random strokes, with labels."""
    rng = np.random.default_rng(0)
    x = np.zeros((2000, 28, 28), np.uint8)
    y = rng.integers(0, 10, 2000)
    for i, c in enumerate(y):
        x[i, 4 + c : 8 + c, 4:24] = 255
        x[i, 4:24, 4 + 2 * c : 6 + 2 * c] = 255
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_trains_one_epoch(name, digits_like, tmp_path):
    run = tmp_path / name
    code = main(["train", "--out", str(run), "--preset", name, "--data", str(digits_like), "--subset", "1000",
                 "--epochs", "1", "--no-progress"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["valid"]["elbo"])
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == name
    for section, values in PRESETS[name].items():  # the run trained with every setting the preset names
        for key, value in values.items():
            if (section, key) != ("train", "epochs"):  # --epochs 1 overrides it
                assert config[section][key] == value, (section, key)
    assert config["train"]["epochs"] == 1 and summary["epochs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_trains_on_real_mnist_subset(name, tmp_path):
    run = tmp_path / name
    assert main(["train", "--out", str(run), "--preset", name, "--subset", "2000", "--epochs", "1",
                 "--no-progress"]) == 0
