"""Run directories: atomic writes, refusal of pickles, clear errors for damaged runs."""

import errno
import os
import pickle
import stat
from pathlib import Path

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


def test_damaged_best_weights_point_to_the_last_epochs(tmp_path):
    cfg = RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    runs.save_config(tmp_path, cfg)
    model = build(cfg.model, seed=0)
    runs.save_weights(tmp_path / "last.safetensors", model)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)  # e.g. truncated by a failing disk
    with pytest.raises(RunError, match="last.safetensors holds the weights of the last epoch"):
        runs.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "last.safetensors").read_bytes())  # as it says
    loaded = runs.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


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
    with pytest.raises(RunError, match="'best' .* or 'last'; got 'bset'"):
        runs.load(tmp_path, which="bset")  # a typo must not quietly load the last epoch's weights


def test_optimizer_state_round_trip(tmp_path):
    """Adam's moments and step counts survive the trip through a file, so the next step is the
    same step."""
    import copy

    from safetensors.torch import load_file

    from vaekit.objectives import elbo

    torch.manual_seed(0)
    model = build(ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    x = torch.rand(5, 3).bernoulli()

    def step(m, o):
        torch.manual_seed(1)
        o.zero_grad()
        elbo(m, x).loss.mean().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    tensors, meta = runs.optimizer_tensors(opt)
    runs.save_tensors(tmp_path / "opt.safetensors", tensors)
    runs.write_json(tmp_path / "opt.json", meta)
    twin = copy.deepcopy(model)
    opt2 = torch.optim.Adam(twin.parameters(), lr=0.5)  # the loaded state brings lr and betas
    opt2.load_state_dict(runs.optimizer_state_dict(load_file(tmp_path / "opt.safetensors"),
                                                   runs.read_json(tmp_path / "opt.json")))
    assert len(opt2.state) == len(list(model.parameters())) > 0
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.9)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    step(model, opt)
    step(twin, opt2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _small_config():
    return RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(3,)))


def test_a_full_disk_while_saving_tensors_is_an_oserror_and_keeps_the_old_file(tmp_path, monkeypatch):
    # safetensors' own file writer reports I/O errors as SafetensorError; ours must be OSError(ENOSPC).
    target = tmp_path / "w.safetensors"
    runs.save_tensors(target, {"a": torch.ones(3)})
    before = target.read_bytes()
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError) as e:
        runs.save_tensors(target, {"a": torch.zeros(1000)})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        runs.write_text(tmp_path / "a.txt", "x")
        runs.create_run(tmp_path / "run", _small_config())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


def test_create_run_makes_directory_and_config_at_once_and_discard_removes_only_its_own(tmp_path):
    cfg = _small_config()
    created = runs.create_run(tmp_path / "a" / "b" / "run", cfg)
    assert created == tmp_path / "a"  # the topmost directory it had to make
    assert runs.load_config(tmp_path / "a" / "b" / "run") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp directory left beside it
    runs.discard_run(tmp_path / "a" / "b" / "run", created)
    assert list(tmp_path.iterdir()) == []

    mine = tmp_path / "mine"  # a directory the user made: kept, only vaekit's files go
    mine.mkdir()
    assert runs.create_run(mine, cfg) is None
    (mine / "metrics.jsonl").write_text("")
    (mine / ".last.safetensors.x1y2.tmp").write_text("")
    (mine / "notes.txt").write_text("not vaekit's")
    runs.discard_run(mine, None)
    assert mine.is_dir() and [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_create_run_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("user data")
    with pytest.raises(RunError, match="cannot create the run directory"):
        runs.create_run(tmp_path / "f" / "run", _small_config())
    assert (tmp_path / "f").read_text() == "user data"


def test_damaged_json_files_of_a_run_are_named(tmp_path):
    (tmp_path / "summary.json").write_text('{"epochs": 3')
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(RunError, match="summary.json is not valid JSON"):
        runs.read_json(tmp_path / "summary.json", default={})
    with pytest.raises(RunError, match="metrics.jsonl is not valid JSON lines"):
        runs.read_jsonl(tmp_path / "metrics.jsonl")
    assert runs.read_json(tmp_path / "missing.json", default={}) == {}


def test_remove_temp_files_removes_only_atomic_write_leftovers(tmp_path):
    for name in (".state.safetensors.abc123.tmp", ".metrics.jsonl.x.tmp", "notes.tmp", ".hidden", "config.json"):
        (tmp_path / name).write_text("x")
    runs.remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "config.json", "notes.tmp"]
