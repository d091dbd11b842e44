"""The training loop: learning, checkpoints, exact resume, guarded numerics."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vaekit import runs
from vaekit.config import RunConfig
from vaekit.data import Dataset, Splits
from vaekit.errors import RunError
from vaekit.models import build
from vaekit.train import fit


def toy_splits(n=240, seed=0):
    """Images of 6×6 made of two kinds of stripes, as uint8: easy to learn, quick to run."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 2, (n,), generator=g)
    base = torch.zeros(n, 1, 6, 6)
    base[kind == 0, :, ::2, :] = 0.9
    base[kind == 1, :, :, ::2] = 0.9
    x = (base * 255 + torch.rand(n, 1, 6, 6, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    ds = Dataset(x, kind, "toy")
    return Splits(ds.take(slice(0, n - 40)), ds.take(slice(n - 40, n)), None)


def toy_config(**train):
    return RunConfig.from_dict({
        "model": {"latent_dim": 2, "hidden": [16], "input_shape": [1, 6, 6]},
        "data": {"source": "toy", "binarize": "dynamic"},
        "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, **train},
    })


def test_fit_learns_and_writes_checkpoints(tmp_path):
    cfg = toy_config(epochs=4)
    model = build(cfg.model)
    metrics = fit(model, cfg, toy_splits(), tmp_path, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["valid_nelbo"] < metrics[0]["valid_nelbo"] - 1.0
    assert runs.read_jsonl(tmp_path / "metrics.jsonl") == metrics
    for name in ("model.safetensors", "last.safetensors", "state.safetensors"):
        assert (tmp_path / name).is_file()
    best = min(metrics, key=lambda m: m["valid_nelbo"])["epoch"]
    # model.safetensors holds the best epoch; if that is the last, it equals last.safetensors
    if best == 4:
        a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "last.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    pass


@pytest.mark.parametrize("binarize", ["dynamic", "static", "none"])
def test_resume_is_bitwise_exact(tmp_path, binarize):
    cfg = toy_config(epochs=3).replace(data={"binarize": binarize})
    splits = toy_splits()
    fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "straight", progress=False)

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    torch.manual_seed(999)  # resume must not depend on whatever the global RNG is at start
    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "broken", progress=False, on_epoch=crash_after_first)
    torch.manual_seed(12345)
    metrics = fit(build(cfg.model), cfg, splits, tmp_path / "broken", resume=True, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "broken" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(runs.read_jsonl(tmp_path / "broken" / "metrics.jsonl")) == strip(
        runs.read_jsonl(tmp_path / "straight" / "metrics.jsonl"))


def test_resume_without_a_finished_epoch_says_so(tmp_path):
    cfg = toy_config()
    with pytest.raises(RunError, match="no epoch finished"):
        fit(build(cfg.model), cfg, toy_splits(), tmp_path, resume=True, progress=False)


def test_non_finite_steps_are_skipped_then_training_stops_with_checkpoint_intact(tmp_path):
    cfg = toy_config(epochs=1, batch_size=8)
    fit(build(cfg.model), cfg, toy_splits(), tmp_path, progress=False)
    good = (tmp_path / "model.safetensors").read_bytes()
    cfg2 = toy_config(epochs=3, batch_size=8)
    model = build(cfg2.model)
    # Poison the weights after they are restored: every loss from here on is NaN.
    orig_load = torch.nn.Module.load_state_dict

    def poisoned(self, sd, *a, **k):
        out = orig_load(self, sd, *a, **k)
        with torch.no_grad():
            self.encoder[0].weight.fill_(float("nan"))
        return out

    torch.nn.Module.load_state_dict = poisoned
    try:
        with pytest.raises(RunError, match="non-finite"):
            fit(model, cfg2, toy_splits(), tmp_path, resume=True, progress=False)
    finally:
        torch.nn.Module.load_state_dict = orig_load
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert len(runs.read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_bf16_autocast_trains(tmp_path):
    cfg = toy_config(epochs=2, precision="bf16")
    metrics = fit(build(cfg.model), cfg, toy_splits(), None, progress=False)
    assert all(torch.isfinite(torch.tensor(m["valid_nelbo"])) for m in metrics)
    assert metrics[-1]["valid_nelbo"] < metrics[0]["valid_nelbo"] + 1.0
    json.dumps(metrics)  # plain floats only
