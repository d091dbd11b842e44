import json

import pytest

from vaekit.config import PRESETS, RunConfig, preset
from vaekit.errors import ConfigError


def test_json_round_trip_is_exact():
    cfg = RunConfig().replace(model={"latent_dim": 7, "hidden": [64, 32], "activation": "tanh"},
                              train={"lr": 3e-4, "grad_clip": 5.0}, data={"subset": 100})
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.model.hidden == (64, 32)  # lists come back as tuples, so equality holds


@pytest.mark.parametrize("bad, words", [
    ({"model": {"latnt_dim": 2}}, ["model.latnt_dim", "latent_dim"]),
    ({"trian": {}}, ["trian"]),
    ({"model": {"latent_dim": "two"}}, ["model.latent_dim", "integer"]),
    ({"model": {"likelihood": "poisson"}}, ["bernoulli", "gaussian"]),
    ({"model": {"latent_dim": 0}}, ["latent_dim", "between 1 and"]),
    ({"model": {"hidden": [2**40]}}, ["hidden", "between 1 and 1,048,576"]),
    ({"train": {"lr": float("inf")}}, ["'train.lr'", "finite"]),
    ({"train": {"grad_clip": -1.0}}, ["grad_clip", "positive"]),
    ({"train": {"batch_size": -5}}, ["batch_size"]),
    ({"train": {"lr": 0}}, ["lr"]),
    ({"train": {"adam_eps": 0.0}}, ["adam_eps", "positive"]),
    ({"train": {"output_bias": "mean"}}, ["train.output_bias", "zero", "data"]),
    ({"train": {"k": 50, "k_start": 5}}, ["k_start", "k_start_epochs", "go together"]),
    ({"train": {"epochs": 10, "k": 50, "k_start": 5, "k_start_epochs": 10}}, ["k_start_epochs (10)", "epochs (10)"]),
    ({"train": {"epochs": 10, "k": 50, "k_start_batch_size": 20}}, ["k_start_batch_size (20)", "set k_start"]),
    ({"train": {"epochs": 10, "k": 50, "k_start": 5, "k_start_epochs": 5, "k_start_batch_size": -1}},
     ["k_start_batch_size", "non-negative", "got -1"]),
    ({"train": {"objective": "norm-penalty", "warmup_steps": 10}}, ["warm-up and free bits", "norm-penalty"]),
    ({"train": {"objective": "norm-penalty", "free_bits": 1.0}}, ["warm-up and free bits", "--beta"]),
    ({"train": {"ema": 1.0}}, ["ema", "[0, 1)", "got 1.0"]),
    ({"train": {"ema": -0.5}}, ["ema", "[0, 1)"]),
    ({"data": {"mnist_valid": 0}}, ["mnist_valid", "between 1 and 59999"]),
    ({"data": {"mnist_valid": 60000}}, ["mnist_valid", "between 1 and 59999"]),
    ({"data": {"source": "my.npz", "mnist_valid": 400}}, ["mnist_valid", "'my.npz'", "valid_fraction"]),
    ({"model": {"arch": "mlp2"}, "train": {"free_bits": 0.5}}, ["free bits", "mlp2", "Drop --free-bits"]),
    ({"train": {"seed": 2**64}}, ["seed", "between 0 and 9223372036854775807"]),
    ({"train": {"seed": -1}}, ["seed", "between 0"]),
])
def test_bad_config_names_the_problem(bad, words):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(bad)
    for w in words:
        assert w in str(e.value)


def test_configs_that_runs_before_2026_12_07_recorded_still_load():
    """grad_clip 0 (no clipping) and a learned σ under a Bernoulli decoder (the flag was ignored) were written
    by earlier versions; their runs must still load."""
    cfg = RunConfig.from_dict({"model": {"learn_sigma": True}, "train": {"grad_clip": 0.0}})
    assert cfg.train.grad_clip == 0.0 and cfg.model.likelihood == "bernoulli"


def test_other_format_version_is_refused():
    d = RunConfig().to_dict()
    d["format_version"] = 99
    with pytest.raises(ConfigError, match="99"):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    RunConfig.from_dict(preset(name))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="available"):
        preset("nope")


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.model.latent_dim = 3  # type: ignore[misc]
    assert json.loads(cfg.to_json())["model"]["latent_dim"] == 20


def test_binarization_defaults_to_what_the_data_and_decoder_call_for():
    from vaekit.config import DataConfig, ModelConfig

    assert RunConfig().data.binarize == "dynamic"  # MNIST under a Bernoulli decoder
    gaussian = RunConfig(model=ModelConfig(likelihood="gaussian"))
    assert gaussian.data.binarize == "none"
    assert RunConfig(data=DataConfig(source="mine.npy")).data.binarize == "none"
    assert RunConfig(data=DataConfig(source="mine.npy", binarize="static")).data.binarize == "static"
    assert RunConfig.from_dict({"model": {"likelihood": "gaussian"}}).data.binarize == "none"
    assert RunConfig.from_json(gaussian.to_json()) == gaussian  # written out resolved
