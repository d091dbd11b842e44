"""Run directories: atomic writes, refusal of pickles, clear errors for damaged runs."""

import os
import pickle

import pytest
import torch

from vaekit import runs
from vaekit.config import ModelConfig, RunConfig
from vaekit.errors import RunError
from vaekit.models import build


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.json"
    runs.write_json(target, {"a": 1})

    def boom(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runs.atomic_write(target, boom)
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/vaekit-pickle-was-executed"


@pytest.mark.parametrize("name", ["model.pt", "weights.pkl", "ckpt.pth"])
def test_pickle_given_as_run_is_refused_without_executing(tmp_path, name):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(RunError, match="pickle"):
        runs.load(path)
    assert not os.path.exists(MARKER)


def test_pickle_in_place_of_weights_is_refused_without_executing(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    cfg = RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    runs.save_config(tmp_path, cfg)
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(RunError, match="damaged"):
        runs.load(tmp_path)
    assert not os.path.exists(MARKER)


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        runs.load(tmp_path / "nope")
    with pytest.raises(RunError, match="config.json"):
        runs.load(tmp_path)


def test_other_version_names_both_versions(tmp_path):
    cfg = RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    runs.save_config(tmp_path, cfg)
    text = (tmp_path / "config.json").read_text().replace('"format_version": 1', '"format_version": 7')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RunError, match=r"version 7.*version 1"):
        runs.load(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    runs.save_config(tmp_path, small)
    runs.save_weights(tmp_path / "model.safetensors", build(ModelConfig(latent_dim=2, hidden=(4, 4), input_shape=(3,))))
    with pytest.raises(RunError, match="does not match"):
        runs.load(tmp_path)


def test_optimizer_state_round_trip():
    model = build(ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.encode(torch.rand(5, 3)).rsample().sum().backward()
    opt.step()
    tensors, meta = runs.optimizer_tensors(opt)
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(runs.optimizer_state_dict(tensors, meta))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
