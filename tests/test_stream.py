"""Data larger than memory: a .npy file streamed from disk trains exactly as it would from memory."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vaekit import data as vdata
from vaekit import runs, train
from vaekit.cli import main
from vaekit.config import RunConfig, merge
from vaekit.data import load_data, load_path
from vaekit.errors import ConfigError, DataError
from vaekit.models import build
from vaekit.train import fit


def stripes(n=300, seed=0) -> np.ndarray:
    """(n, 6, 6) uint8 images of two kinds of stripes with noise."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 6, 6))
    kind = rng.integers(0, 2, n)
    x[kind == 0, ::2, :] = 0.9
    x[kind == 1, :, ::2] = 0.9
    return np.clip(x * 255 + rng.random(x.shape) * 20, 0, 255).astype(np.uint8)


@pytest.fixture
def npy(tmp_path) -> Path:
    path = tmp_path / "stripes.npy"
    np.save(path, stripes())
    return path


def config(source, stream, **train):
    return RunConfig.from_dict({
        "model": {"latent_dim": 2, "hidden": [16], "input_shape": [1, 6, 6]},
        "data": {"source": str(source), "binarize": "dynamic", "stream": stream},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, **train},
    })


def weights(path):
    return load_file(str(path))


def without_seconds(ms):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in ms]


def test_a_streamed_set_holds_the_same_examples_without_reading_them(npy):
    mem, disk = load_data(str(npy), stream="no"), load_data(str(npy), stream="yes")
    assert disk.train.streamed and not mem.train.streamed
    assert not disk.valid.streamed  # the validation split is read into memory
    assert len(disk.train) == len(mem.train) == 270 and disk.train.shape == mem.train.shape == (1, 6, 6)
    assert disk.train.x.shape == (300, 1, 6, 6)  # the whole file, mapped
    assert torch.equal(disk.train.examples(), mem.train.x)  # the same split, row for row
    assert torch.equal(disk.valid.x, mem.valid.x)
    assert torch.equal(disk.train.float(torch.tensor([5, 0, 7])), mem.train.float(torch.tensor([5, 0, 7])))
    sub = disk.train.take(slice(10, 20))
    assert sub.streamed and torch.equal(sub.examples(), mem.train.x[10:20])
    assert torch.equal(load_data(str(npy), stream="yes", subset=50).train.examples(), mem.train.x[:50])


@pytest.mark.parametrize("kind", ["uint8 images, dynamic binarization", "float32 vectors, gaussian"])
def test_streamed_training_is_bitwise_the_in_memory_training(tmp_path, kind):
    path = tmp_path / "data.npy"
    if kind.startswith("uint8"):
        np.save(path, stripes())
        extra = {}
    else:
        np.save(path, (stripes().reshape(300, 36) / 255).astype(np.float32))
        extra = {"model": {"likelihood": "gaussian", "input_shape": [36]}, "data": {"binarize": "none"}}
    results = {}
    for stream in ("no", "yes"):
        cfg = RunConfig.from_dict(merge(config(path, stream).to_dict(), extra))
        splits = load_data(str(path), stream=stream)
        assert splits.train.streamed == (stream == "yes")
        torch.manual_seed(99)  # the loop seeds the global RNG itself; nothing else may draw from it
        results[stream] = fit(build(cfg.model, seed=0), cfg, splits, tmp_path / stream, progress=False)
    assert without_seconds(results["yes"]) == without_seconds(results["no"])
    a, b = weights(tmp_path / "no" / "last.safetensors"), weights(tmp_path / "yes" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["yes"][-1]["valid_nelbo"] < results["yes"][0]["valid_nelbo"]  # it learnt something


def test_a_streamed_run_resumes_mid_epoch_exactly(tmp_path, npy, monkeypatch):
    cfg = config(npy, "yes", epochs=2, checkpoint_every=4)  # 270 images, batch 32: 9 steps an epoch
    splits = load_data(str(npy), stream="yes")
    straight = fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "straight", progress=False)

    real, calls = train.elbo, [0]

    def crash_at_step_11(model, x, **kw):
        if model.training:
            calls[0] += 1
            if calls[0] == 11:
                raise KeyboardInterrupt
        return real(model, x, **kw)

    monkeypatch.setattr(train, "elbo", crash_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "broken", progress=False)
    monkeypatch.undo()
    resumed = fit(build(cfg.model, seed=5), cfg, splits, tmp_path / "broken", resume=True, progress=False)
    assert without_seconds(resumed) == without_seconds(straight)
    a, b = weights(tmp_path / "straight" / "last.safetensors"), weights(tmp_path / "broken" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_streams_only_a_file_larger_than_the_memory_budget(npy, monkeypatch):
    size = npy.stat().st_size
    monkeypatch.setattr(vdata, "memory_budget", lambda: size + 1)
    assert not load_path(npy, "auto").streamed
    monkeypatch.setattr(vdata, "memory_budget", lambda: size - 1)
    assert load_path(npy, "auto").streamed
    assert not load_path(npy, "no").streamed
    monkeypatch.setattr(vdata, "memory_budget", lambda: None)  # unknown: keep it in memory
    assert not load_path(npy, "auto").streamed


def test_memory_budget_is_half_of_the_memory_available_now(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   8000000 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                         *a, **k))
    assert vdata.memory_budget() == 8_000_000 * 1024 // 2
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(vdata.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    assert vdata.memory_budget() == 1000 * 4096 // 2  # without /proc: the pages available, halved


def _anon_rss() -> int:
    """Resident anonymous memory of this process (not the file pages a mapping reads), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_streaming_a_file_takes_no_memory_of_its_size(tmp_path):
    n, path = 128_000, tmp_path / "big.npy"  # 100 MB of uint8 images
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))[:] = 7
    gc_before = _anon_rss()
    splits = load_data(str(path), stream="yes", valid_fraction=0.01)
    data = train.train_set(splits.train, config(path, "yes"), torch.device("cpu"))
    order = torch.randperm(len(data))
    for seen, xb in enumerate(train.raw_batches(data, order, 0, 1000, torch.device("cpu"))):
        assert xb.shape == (1000, 1, 28, 28) or seen == len(order) // 1000
    grown = _anon_rss() - gc_before
    assert seen + 1 == -(-len(order) // 1000)
    assert grown < 0.25 * path.stat().st_size, f"streaming grew anonymous memory by {grown / 2**20:.0f} MiB"
    in_memory = load_data(str(path), stream="no", valid_fraction=0.01)  # the check can fail: this one holds it
    assert _anon_rss() - gc_before > 0.9 * path.stat().st_size
    del in_memory


def test_streaming_refuses_what_it_cannot_do(tmp_path, npy):
    np.savez(tmp_path / "d.npz", x=stripes())
    with pytest.raises(DataError, match="only a .npy file can be streamed"):
        load_path(tmp_path / "d.npz", "yes")
    np.save(tmp_path / "f64.npy", stripes().astype(np.float64) / 255)
    with pytest.raises(DataError, match="uint8 or float32.*float64"):
        load_path(tmp_path / "f64.npy", "yes")
    bad = (stripes() / 255).astype(np.float32)
    bad[123, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="example 123"):
        load_path(tmp_path / "nan.npy", "yes")
    with pytest.raises(DataError, match="MNIST is small"):
        load_data("mnist", stream="yes")
    with pytest.raises(DataError, match="stream must be one of"):
        load_path(npy, "sometimes")
    with pytest.raises(ConfigError, match="static binarization"):
        config(npy, "yes").replace(data={"binarize": "static"})
    splits = load_data(str(npy), stream="yes")  # "auto" chose to stream, and the config asks for static
    with pytest.raises(DataError, match="static binarization"):
        train.train_set(splits.train, config(npy, "auto").replace(data={"binarize": "static"}), torch.device("cpu"))


def test_cli_trains_on_a_streamed_file_and_refuses_a_bad_one_leaving_nothing(tmp_path, npy, capsys):
    run = tmp_path / "run"
    args = ["train", "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "30", "--no-progress",
            "--binarize", "dynamic", "--stream", "yes"]
    assert main([*args, "--data", str(npy), "--out", str(run)]) == 0
    assert "training batches are read from disk" in capsys.readouterr().err
    assert runs.load_config(run).data.stream == "yes"
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert main(["data", "info", str(npy)]) == 0
    assert "train: 270" in capsys.readouterr().out

    np.savez(tmp_path / "d.npz", x=stripes())
    bad_run = tmp_path / "bad"
    assert main([*args, "--data", str(tmp_path / "d.npz"), "--out", str(bad_run)]) != 0
    assert "only a .npy file can be streamed" in capsys.readouterr().err
    assert not bad_run.exists()


def test_encode_reads_a_streamed_split_in_parts_with_the_pixels_of_the_whole(tmp_path, npy, monkeypatch):
    from vaekit import cli, generate

    run = tmp_path / "run"
    assert main(["train", "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "30",
                 "--no-progress", "--binarize", "dynamic", "--stream", "yes", "--data", str(npy),
                 "--out", str(run)]) == 0
    monkeypatch.setattr(cli, "ENCODE_PART", 100)  # 270 training images: three parts
    assert main(["encode", str(run), "--split", "train"]) == 0
    cfg = runs.load_config(run)
    whole = load_data(str(npy), stream="no").train
    expected = generate.encode_mean(runs.load(run), train.eval_set(whole, cfg.data))
    torch.testing.assert_close(torch.from_numpy(np.load(run / "codes_train.npz")["z"]), expected)


def test_the_mean_image_of_a_streamed_set_is_the_in_memory_one(npy):
    cfg = config(npy, "yes")
    mem = train.train_set(load_data(str(npy), stream="no").train, cfg, torch.device("cpu"))
    disk = train.train_set(load_data(str(npy), stream="yes").train, cfg, torch.device("cpu"))
    want = (mem.x.double().mean(0) / 255).float()
    torch.testing.assert_close(mem.mean(chunk=7), want)  # 270 images in chunks of 7: the last one short
    torch.testing.assert_close(disk.mean(chunk=7), want)
