"""Reliability end to end: runs killed at random moments, bad input, full disks, old formats.

The CLI is driven in-process (`vaekit.cli.main`) except for the SIGKILL test, which
needs a real process to kill.
"""

import errno
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vaekit import runs, train
from vaekit.cli import main
from vaekit.config import ModelConfig, RunConfig
from vaekit.data import load_data
from vaekit.models import build

SRC = Path(__file__).parents[1] / "src"


def blobs(n, seed=0):
    """n 8×8 uint8 'images' of three blob positions with 5% flipped pixels, and their labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.zeros((n, 8, 8), np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 3, 2:6] = 255
    return np.where(rng.random(x.shape) < 0.05, 255 - x, x).astype(np.uint8), y


@pytest.fixture
def npz(tmp_path):
    x, y = blobs(300)
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    return tmp_path / "blobs.npz"


def train_args(out, data, *extra):
    return ["train", "--out", str(out), "--data", str(data), "--latent-dim", "2", "--hidden", "32",
            "--epochs", "1", "--batch-size", "50", "--no-progress", *extra]


def resume_args(out):
    return ["train", "--out", str(out), "--resume", "--no-progress"]


def metrics_without_seconds(run):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in runs.read_jsonl(run / "metrics.jsonl")]


def state_counters(run):
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def fit_straight(run, out):
    """Train ``run``'s config uninterrupted into ``out``, as `vaekit train` would, without the figures."""
    cfg = runs.load_config(run)
    splits = load_data(cfg.data.source, subset=cfg.data.subset, valid_fraction=cfg.data.valid_fraction,
                       split_seed=cfg.data.split_seed)
    train.fit(build(cfg.model, seed=cfg.train.seed), cfg, splits, out, progress=False)
    return out


def assert_same_training(a, b):
    """Bitwise the same weights, and the same metrics but for timing."""
    for name in ("last.safetensors", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metrics_without_seconds(a) == metrics_without_seconds(b)


# ----------------------------------------------------------------------------- SIGKILL
EPOCHS = 16  # 54 steps an epoch and a checkpoint every 20 (each costs an fsync or two)


def check_killed_run(run, echoed):
    """Every file a killed run left must be whole. ``echoed``: the last epoch it reported done.

    Returns the epoch of its checkpoint (0: none yet), or None if the run was not created.
    """
    if not run.exists():
        assert echoed == 0
        return None
    epochs, state_epoch = [], 0
    for p in run.iterdir():
        if runs.is_temp_file(p):  # a write cut short by the kill: never read as data
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.name == "metrics.jsonl":
            epochs = [json.loads(line)["epoch"] for line in p.read_text().splitlines()]
        elif p.suffix == ".safetensors":
            assert load_file(str(p))
            if p.name == "state.safetensors":
                state_epoch = state_counters(run)["epoch"]
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".html":
            assert p.read_text().rstrip().endswith("</html>")
        else:
            pytest.fail(f"unexpected file {p.name} in a run")
    assert (run / "config.json").is_file()  # the run directory appears together with its config
    assert epochs == list(range(1, len(epochs) + 1))  # a prefix 1..k
    # metrics.jsonl is written just before the checkpoint that commits its epoch
    assert len(epochs) in (state_epoch, state_epoch + 1)
    assert state_epoch >= echoed  # no epoch reported finished was lost
    return state_epoch


def run_until_killed(cmd, env, after_lines, delay):
    """Start ``cmd``; SIGKILL it ``delay(gap)`` seconds after it has printed ``after_lines`` "epoch"
    lines (``gap``: seconds between its last two, None if unknown), or at its next "epoch" line if
    that comes first. Returns (exit code, its stderr lines).

    Aiming by the process's own epoch reports lands the kill where it was meant to on a slow
    machine as on a fast one; the delay makes the moment within that stretch random.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, proc.stderr), lines.put(None)], daemon=True)
    reader.start()
    seen, stamps, deadline = [], [], None
    while True:
        if len(stamps) == after_lines and deadline is None:
            gap = stamps[-1] - stamps[-2] if len(stamps) >= 2 else None
            deadline = time.monotonic() + delay(gap)
        try:
            line = lines.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
        except queue.Empty:
            break  # the moment has come
        if line is None:  # it ended before the kill
            reader.join()
            return proc.wait(), seen
        seen.append(line)
        if line.startswith("epoch"):
            stamps.append(time.monotonic())
            if deadline is not None:
                break
    proc.kill()
    code = proc.wait()
    reader.join()
    return code, seen


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    x, y = blobs(3000)
    data = tmp_path / "blobs.npz"
    np.savez(data, x=x, y=y)
    args = lambda out: train_args(out, data, "--epochs", str(EPOCHS), "--checkpoint-every", "20")  # noqa: E731
    # One thread: on a busy 2-core machine torch's spinning worker threads make a run many times slower.
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    vaekit = [sys.executable, "-m", "vaekit"]
    start = time.monotonic()
    ref = subprocess.Popen([*vaekit, *args(tmp_path / "ref")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    stamps = [time.monotonic() - start for line in ref.stderr if line.startswith("epoch")]
    assert ref.wait() == 0 and len(stamps) == EPOCHS
    startup, finish = stamps[0], time.monotonic() - start - stamps[-1]  # before epoch 1 ends; after the last

    # Where each kill is aimed: 0 = during start-up or epoch 1 (before or after the run directory
    # appears, before or after its first checkpoint); "mid" = part-way through an epoch, k >= 2
    # epochs after this process started; "end" = while the figures and report are written.
    rng = random.Random(20240607)
    run, kills, in_training, restarts = tmp_path / "run", 0, 0, 0
    for aim in [0, "mid", "mid", "mid", "end"]:
        done = state_counters(run)["epoch"] if (run / "state.safetensors").exists() else 0
        fraction = rng.random()
        if aim == 0:
            after, delay = 0, lambda gap: fraction * startup
        elif aim == "mid":  # at most a third of what is left, so the run is never over before its kill
            after, delay = rng.randint(2, max(2, (EPOCHS - done) // 3)), lambda gap: fraction * gap
        else:
            after, delay = EPOCHS - done, lambda gap: fraction * finish
        code, lines = run_until_killed([*vaekit, *(resume_args(run) if run.exists() else args(run))], env,
                                       after, delay)
        restarts += any("no checkpoint yet" in line for line in lines)
        if code == 0:  # it finished before the kill (only possible when aimed at the end)
            assert aim == "end"
            break
        assert code == -9, "".join(lines)  # died of the kill, not of an error
        kills += 1
        echoed = max((int(line.split()[1]) for line in lines if line.startswith("epoch")), default=0)
        checkpoint = check_killed_run(run, echoed)
        in_training += checkpoint is not None and 0 < checkpoint < EPOCHS
    assert kills >= 4 and in_training >= 3

    proc = subprocess.run([*vaekit, *(resume_args(run) if run.exists() else args(run))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_training(tmp_path / "ref", run)
    assert not any(runs.is_temp_file(p) for p in run.iterdir())
    print(f"{kills} kills, {in_training} mid-training, {restarts} restarts from scratch")


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, npz, monkeypatch, capsys):
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupted)
    assert main(train_args(run, npz)) == 130
    monkeypatch.undo()
    assert [p.name for p in run.iterdir()] == ["config.json"]  # kept: it can be resumed
    capsys.readouterr()
    assert main(resume_args(run)) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert [m["epoch"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1]
    assert_same_training(fit_straight(run, tmp_path / "straight"), run)


# ----------------------------------------------------------------------------- bad input
def _write_inputs(tmp: Path) -> None:
    a = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    nan = a.copy()
    nan[7, 2] = np.nan
    np.save(tmp / "nan.npy", nan)
    inf = np.random.default_rng(0).random((50, 8, 8)).astype(np.float32)
    inf[3, 1, 1] = np.inf
    np.savez(tmp / "inf.npz", x=inf)
    np.save(tmp / "two.npy", a * 2)  # values in [0, 2)
    np.save(tmp / "flat.npy", np.zeros(10, np.float32))
    np.save(tmp / "five_d.npy", np.zeros((2, 1, 1, 1, 4), np.float32))
    np.save(tmp / "empty.npy", np.zeros((0, 4), np.float32))
    (tmp / "empty_folder").mkdir()
    (tmp / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "mixed" / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp / "mixed" / "b.png")
    (tmp / "typo.json").write_text(json.dumps({"train": {"epoch": 3}}))
    (tmp / "latin1.json").write_bytes('{"train": {"lr": 0.001}, "preset": "é"}'.encode("latin-1"))
    x = np.zeros((20, 8, 8), np.uint8)
    np.savez(tmp / "far_labels.npz", x=x, y=np.r_[np.arange(19), 10**9])  # labels 0..18 and one of 10**9
    np.savez(tmp / "gap_labels.npz", x=x, y=np.r_[np.zeros(10, int), np.ones(9, int), 3])  # labels 0, 1 and 3


def _corrupt_mnist_cache(truncate: bool) -> None:
    path = Path(os.environ["VAEKIT_HOME"]) / "mnist" / "mnist.npz"
    path.parent.mkdir(parents=True)
    if truncate:
        np.savez_compressed(path, x_train=np.zeros((100, 28, 28), np.uint8))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"this is not a zip file" * 10)


BAD_INPUTS = {
    "nan": (["--data", "{tmp}/nan.npy"], ["NaN", "example 7", "remove or fix"]),
    "inf": (["--data", "{tmp}/inf.npz"], ["infinite", "remove or fix"]),
    "bernoulli outside [0,1]": (["--data", "{tmp}/two.npy"], ["[0, 1]", "--likelihood gaussian"]),
    "1-d array": (["--data", "{tmp}/flat.npy"], ["shape (10,)", "Reshape"]),
    "5-d array": (["--data", "{tmp}/five_d.npy"], ["accepted shapes"]),
    "mixed image sizes": (["--data", "{tmp}/mixed"], ["differ in size", "8x8", "8x9", "resize"]),
    "empty array": (["--data", "{tmp}/empty.npy"], ["empty", "at least one"]),
    "empty folder": (["--data", "{tmp}/empty_folder"], ["empty"]),
    "corrupt mnist cache": (["--data", "mnist"], ["corrupt or truncated", "vaekit data fetch mnist --force"]),
    "truncated mnist cache": (["--data", "mnist"], ["corrupt or truncated", "vaekit data fetch mnist --force"]),
    "unknown key in --config": (["--data", "{npz}", "--config", "{tmp}/typo.json"], ["'train.epoch'", "epochs"]),
    "unknown section in --set": (["--data", "{npz}", "--set", "trian.lr=0.1"], ["'trian'", "train"]),
    "negative latent size": (["--data", "{npz}", "--latent-dim", "-1"], ["latent_dim", "between 1 and"]),
    "huge latent size": (["--data", "{npz}", "--latent-dim", "99999999999999999999"], ["latent_dim", "between 1 and"]),
    "huge k": (["--data", "{npz}", "--k", "1000000000"], ["k (samples of z", "between 1 and"]),
    "huge thread count": (["--data", "{npz}", "--threads", "99999999999999999999"], ["--threads", "between 1 and"]),
    "infinite learning rate": (["--data", "{npz}", "--lr", "inf"], ["'train.lr'", "finite"]),
    "NaN free bits": (["--data", "{npz}", "--free-bits", "nan"], ["'train.free_bits'", "finite"]),
    "negative gradient clip": (["--data", "{npz}", "--set", "train.grad_clip=-1"], ["grad_clip", "positive"]),
    "σ for a Bernoulli decoder": (["--data", "{npz}", "--sigma", "0.5"], ["--sigma", "--likelihood gaussian"]),
    "learned σ for a Bernoulli decoder": (["--data", "{npz}", "--sigma", "learned"], ["--sigma learned",
                                                                                        "--likelihood gaussian"]),
    "labels up to 10**9 for a conditional model": (["--data", "{tmp}/far_labels.npz", "--conditional",
                                                    "--batch-size", "4"],
                                                   ["labels run up to 1000000000", "999999981 of those labels never occur",
                                                    "0..C-1"]),
    "a label missing below the largest": (["--data", "{tmp}/gap_labels.npz", "--conditional", "--batch-size", "4"],
                                          ["labels run up to 3", "1 of those labels never occurs (e.g. 2)"]),
    "--config not UTF-8": (["--data", "{npz}", "--config", "{tmp}/latin1.json"], ["latin1.json", "not valid JSON"]),
    "--config a folder": (["--data", "{npz}", "--config", "{tmp}"], ["is a folder", "config.json"]),
    "zero batch size": (["--data", "{npz}", "--batch-size", "0"], ["batch_size", "at least 1"]),
    "zero hidden width": (["--data", "{npz}", "--hidden", "0"], ["hidden", "between 1 and"]),
    "zero checkpoint interval": (["--data", "{npz}", "--checkpoint-every", "0"], ["checkpoint_every", "at least 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_says_what_to_do_and_writes_nothing(tmp_path, npz, capsys, case):
    _write_inputs(tmp_path)
    if "mnist" in case:
        _corrupt_mnist_cache(truncate=case.startswith("truncated"))
    extra, words = BAD_INPUTS[case]
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "runs" / "r"
    args = ["train", "--out", str(out), "--epochs", "1", "--no-progress",
            *(a.format(tmp=tmp_path, npz=npz) for a in extra)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    for w in words:
        assert w in err
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, not even its parent


def test_debug_prints_the_traceback_of_a_bad_input(tmp_path, capsys):
    _write_inputs(tmp_path)
    assert main(["--debug", "train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nan.npy")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and "error:" in err
    assert not (tmp_path / "r").exists()


def test_bad_data_leaves_an_out_directory_the_user_made_as_it_was(tmp_path, capsys):
    _write_inputs(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["train", "--out", str(mine), "--data", str(tmp_path / "inf.npz")]) == 2
    assert mine.is_dir() and list(mine.iterdir()) == []


@pytest.mark.parametrize("user_made_out", [False, True])
def test_failure_before_the_first_checkpoint_removes_the_run(tmp_path, npz, monkeypatch, capsys, user_made_out):
    real = train.elbo
    def nan_loss(model, x, **kw):
        parts = real(model, x, **kw)
        return parts._replace(loss=parts.loss * float("nan"))

    monkeypatch.setattr(train, "elbo", nan_loss)
    out = tmp_path / "r"
    if user_made_out:
        out.mkdir()
    # 27 steps in epoch 1: training stops at the 20th non-finite step, before any checkpoint
    assert main(train_args(out, npz, "--batch-size", "10")) == 2
    assert "diverged" in capsys.readouterr().err
    assert (out.is_dir() and list(out.iterdir()) == []) if user_made_out else not out.exists()


def test_out_under_a_file_is_refused_before_anything_is_written(tmp_path, npz, capsys):
    (tmp_path / "f").write_text("user data")
    assert main(train_args(tmp_path / "f" / "run", npz)) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Choose" in err
    assert (tmp_path / "f").read_text() == "user data"


def test_out_that_cannot_be_written_is_refused_and_nothing_is_left(tmp_path, npz, monkeypatch, capsys):
    # Tests run as root, where a read-only directory is still writable: fake the refusal.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(train_args(tmp_path / "r", npz)) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.undo()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", denied)  # os.access says yes, creating the run still fails
    before = sorted(tmp_path.rglob("*"))
    assert main(train_args(tmp_path / "a" / "b" / "r", npz)) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before  # the parents it made are gone too


def test_a_nearly_full_disk_fails_before_training(tmp_path, npz, monkeypatch, capsys):
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=100, f_frsize=4096))
    assert main(train_args(tmp_path / "r", npz)) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and "Free some space" in err
    assert not (tmp_path / "r").exists()


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resume_completes(tmp_path, npz, monkeypatch,
                                                                                  capsys):
    run, real, writes = tmp_path / "run", runs.atomic_write, []

    def full_at_second_checkpoint(path, write):
        if path.name == "state.safetensors":
            writes.append(path)
            if len(writes) == 2:
                def half_then_full(p):  # the temp file is half written when the disk fills up
                    write(p)
                    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, half_then_full)
        return real(path, write)

    monkeypatch.setattr(runs, "atomic_write", full_at_second_checkpoint)
    assert main(train_args(run, npz, "--epochs", "2")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "disk is full" in err and "epoch 1" in err and f"vaekit train --out {run} --resume" in err
    assert state_counters(run)["epoch"] == 1 and not any(runs.is_temp_file(p) for p in run.iterdir())
    assert main(resume_args(run)) == 0
    assert_same_training(fit_straight(run, tmp_path / "straight"), run)


# ----------------------------------------------------------------------------- other versions, resume flags
def _run_of_format_version(tmp_path, version):
    run = tmp_path / "old"
    runs.create_run(run, RunConfig(model=ModelConfig(latent_dim=2, hidden=(4,), input_shape=(1, 8, 8))))
    text = (run / "config.json").read_text().replace('"format_version": 1', f'"format_version": {version}')
    (run / "config.json").write_text(text)
    return run


@pytest.mark.parametrize("command", [["train", "--out", "{run}", "--resume"], ["eval", "{run}"]])
def test_a_run_of_another_format_version_names_both_versions(tmp_path, capsys, command):
    run = _run_of_format_version(tmp_path, 7)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main([a.format(run=run) for a in command]) == 2
    err = capsys.readouterr().err
    assert "format version 7" in err and "format version 1" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_refuses_flags_it_would_ignore(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert main([*resume_args(run), "--lr", "0.1", "--batch-size", "7"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size, --lr" in err and "config.json" in err
    assert [m["epoch"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1]


def test_resume_of_a_run_without_its_checkpoint_keeps_its_weights(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    (run / "state.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(resume_args(run)) == 2
    err = capsys.readouterr().err
    assert "no state.safetensors" in err and "new run" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_on_other_data_of_the_same_shape_is_refused(tmp_path, capsys):
    data = tmp_path / "data.npz"
    x, y = blobs(300)
    np.savez(data, x=x, y=y)
    run = tmp_path / "run"
    assert main(train_args(run, data)) == 0
    x[150] = 255 - x[150]  # one example changed (under 1024 examples, each is in the fingerprint)
    np.savez(data, x=x, y=y)
    config = (run / "config.json").read_bytes()
    assert main([*resume_args(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "has changed since the run began" in err and "Traceback" not in err
    assert [m["epoch"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1]
    assert (run / "config.json").read_bytes() == config  # the refused --epochs 2 is not recorded


def test_resume_of_an_unconditional_run_ignores_its_data_gaining_labels(tmp_path, capsys):
    data = tmp_path / "data.npz"
    x, y = blobs(300)
    np.savez(data, x=x)
    run = tmp_path / "run"
    assert main(train_args(run, data)) == 0
    np.savez(data, x=x, y=y)  # the model reads no labels: the same data for it
    assert main([*resume_args(run), "--epochs", "2"]) == 0
    assert runs.load_config(run).train.epochs == 2


def test_resume_after_a_stop_while_writing_the_first_checkpoint_starts_again(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    for name in ("state.safetensors", "summary.json"):  # as if stopped before the commit point of epoch 1
        (run / name).unlink()
    assert main(resume_args(run)) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert [m["epoch"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1]
    assert (run / "state.safetensors").is_file() and runs.read_json(run / "summary.json")["epochs"] == 1  # retrained


def test_resume_of_a_run_past_its_first_epoch_without_its_checkpoint_keeps_it(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main([*train_args(run, npz), "--epochs", "2"]) == 0
    for name in ("state.safetensors", "summary.json"):
        (run / name).unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(resume_args(run)) == 2
    assert "no state.safetensors" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_after_config_json_was_edited_names_the_mismatch(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["latent_dim"] = 7
    (run / "config.json").write_text(json.dumps(cfg))
    assert main([*resume_args(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model described in config.json" in err and "Traceback" not in err


def test_resume_with_a_damaged_summary_fails_before_training_and_says_how_to_mend_it(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    (run / "summary.json").write_text('{"epochs": 1, "te')
    assert main([*resume_args(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "summary.json is not valid JSON" in err and "delete it" in err and f"vaekit plot {run}" in err
    assert [m["epoch"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1]  # no epoch trained, then lost
    (run / "summary.json").unlink()
    assert main(["plot", str(run)]) == 0
    assert runs.read_json(run / "summary.json")["epochs"] == 1


def test_ctrl_c_after_a_checkpoint_names_the_run_to_resume(tmp_path, npz, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupted)
    capsys.readouterr()
    assert main([*resume_args(run), "--epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert f"vaekit train --out {run} --resume" in err
    assert "saved up to its last checkpoint" in err and "before the first checkpoint" not in err


def test_eval_shows_its_result_when_the_run_folder_cannot_be_written(tmp_path, npz, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    before = (run / "summary.json").read_bytes()

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runs, "write_json", refused)
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "3"]) == 2
    captured = capsys.readouterr()
    assert "nll" in captured.out  # the work is shown, not lost
    assert "not recorded" in captured.err and "Permission denied" in captured.err and "Traceback" not in captured.err
    assert (run / "summary.json").read_bytes() == before


def test_eval_refuses_an_absurd_k(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    assert main(["eval", str(run), "--k", "1000001", "--limit", "1"]) == 2  # just past the bound: quick unchecked
    assert "more than 1,000,000" in capsys.readouterr().err


def test_resume_with_more_epochs_extends_a_finished_run_exactly(tmp_path, npz):
    """Training 1 epoch then extending to 3 gives the weights of a 3-epoch run (constant learning rate)."""
    once, extended = tmp_path / "once", tmp_path / "extended"
    assert main([*train_args(once, npz), "--epochs", "3"]) == 0
    assert main(train_args(extended, npz)) == 0
    assert main([*resume_args(extended), "--epochs", "3"]) == 0
    assert json.loads((extended / "config.json").read_text())["train"]["epochs"] == 3
    assert [m["epoch"] for m in runs.read_jsonl(extended / "metrics.jsonl")] == [1, 2, 3]
    a = load_file(str(once / "last.safetensors"))
    b = load_file(str(extended / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_cannot_shorten_a_run_or_stretch_a_schedule(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main([*train_args(run, npz), "--epochs", "2"]) == 0
    assert main([*resume_args(run), "--epochs", "1"]) == 2
    assert "trained 2 epochs" in capsys.readouterr().err
    cosine = tmp_path / "cosine"
    assert main([*train_args(cosine, npz), "--lr-schedule", "cosine"]) == 0
    assert main([*resume_args(cosine), "--epochs", "4"]) == 2
    assert "cosine" in capsys.readouterr().err
    assert json.loads((cosine / "config.json").read_text())["train"]["epochs"] == 1


@pytest.mark.parametrize("changed", ["shape", "size"])
def test_resume_on_data_that_changed_since_the_run_began_says_so_and_leaves_the_run(tmp_path, npz, capsys, changed):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    x = np.zeros((300, 10, 10), np.uint8) if changed == "shape" else np.load(npz)["x"][:40]
    np.savez(npz, x=x)  # the run's data file, replaced
    assert main([*resume_args(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "the data has changed since the run began" in err and "Traceback" not in err
    assert ("[1, 8, 8]" in err and "[1, 10, 10]" in err) if changed == "shape" else "batches of 50" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.json too: still 1 epoch


def test_a_run_whose_data_changed_shape_is_refused_by_the_commands_that_read_it(tmp_path, npz, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, npz)) == 0
    np.savez(npz, x=np.zeros((300, 10, 10), np.uint8))
    capsys.readouterr()
    for command in (["reconstruct", str(run), "--n", "2"], ["eval", str(run), "--k", "2", "--limit", "2"],
                    ["encode", str(run)], ["plot", str(run)], ["compare", str(run), "--out", str(tmp_path / "c")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "the data has changed since the run began" in err and "Traceback" not in err, command
