"""The training loop: learning, checkpoints, exact resume, guarded numerics."""

import errno
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vaekit
from vaekit import runs, train
from vaekit.config import RunConfig
from vaekit.data import Dataset, Splits
from vaekit.errors import DataError, RunError
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


def test_model_safetensors_holds_the_weights_of_the_best_validation_epoch(tmp_path, monkeypatch):
    cfg = toy_config(epochs=4)
    model = build(cfg.model)
    real = train.elbo_means
    scores = iter([5.0, 3.0, 4.0, 6.0])  # validation −ELBO of epochs 1..4, as if measured: epoch 2 is best

    def judged(*args, **kwargs):
        return {**real(*args, **kwargs), "nelbo": next(scores)}

    monkeypatch.setattr(train, "elbo_means", judged)
    snapshots = []
    metrics = fit(model, cfg, toy_splits(), tmp_path, progress=False,
                  on_epoch=lambda r: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert [m["valid_nelbo"] for m in metrics] == [5.0, 3.0, 4.0, 6.0]
    best, last = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "last.safetensors"))
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert all(torch.equal(last[k], snapshots[3][k]) for k in last)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_with_a_gradient_clip_a_non_finite_gradient_skips_the_step(tmp_path):
    cfg = toy_config(epochs=1, grad_clip=1.0)
    model = build(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = next(model.parameters())
    weight.register_hook(lambda g: g * float("nan"))  # the loss stays finite; one gradient does not
    with pytest.raises(RunError, match="diverged in epoch 1: 20 steps in a row had a non-finite loss or gradient"):
        fit(model, cfg, toy_splits(n=1000), tmp_path, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no step was taken


def test_an_epoch_with_no_finite_step_stops_training(tmp_path):
    cfg = toy_config(epochs=2, grad_clip=1.0)
    model = build(cfg.model)
    next(model.parameters()).register_hook(lambda g: g * float("nan"))
    # 200 images in batches of 32: 7 steps, too few for the 20 in a row, and every one skipped
    with pytest.raises(RunError, match="diverged in epoch 1: none of its 7 steps had a finite loss or gradient"):
        fit(model, cfg, toy_splits(), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing recorded as if it had trained


def test_a_gradient_clip_bounds_the_gradient_norm_of_each_step(monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def clip_and_measure(params, max_norm):
        params = list(params)
        total = real(params, max_norm)
        norms.append((total.item(), torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()))
        return total

    def norm_at_the_update(opt, args, kwargs):  # what the optimizer steps with
        grads = [p.grad.norm() for group in opt.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(torch.linalg.vector_norm(torch.stack(grads)).item())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_measure)
    stepped = []
    hook = register_optimizer_step_pre_hook(norm_at_the_update)
    try:
        cfg = toy_config(epochs=1, grad_clip=0.5)
        fit(build(cfg.model), cfg, toy_splits(), None, progress=False)
    finally:
        hook.remove()
    assert len(norms) == 7  # 200 training images in batches of 32
    assert all(before > 0.5 for before, _ in norms)  # the clip was in play at every step
    assert all(after == pytest.approx(0.5, rel=1e-4) for _, after in norms)
    assert len(stepped) == 7 and all(n == pytest.approx(0.5, rel=1e-4) for n in stepped)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_is_exact_and_validation_leaves_the_gpus_random_stream_alone(tmp_path):
    cfg = toy_config(epochs=3)
    splits = toy_splits()
    fit(build(cfg.model, seed=0).cuda(), cfg, splits, tmp_path / "straight", progress=False)

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0).cuda(), cfg, splits, tmp_path / "broken", progress=False,
            on_epoch=crash_after_first)
    torch.cuda.manual_seed(12345)
    fit(build(cfg.model).cuda(), cfg, splits, tmp_path / "broken", resume=True, progress=False)
    assert _weights_equal(tmp_path / "straight" / "last.safetensors", tmp_path / "broken" / "last.safetensors")


def test_seeded_blocks_draw_from_their_seed_and_leave_the_global_stream_as_it_was():
    from vaekit.distributions import seeded

    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    with seeded(0):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_next)  # as if the block had not run
    torch.manual_seed(0)
    assert torch.equal(inside, torch.rand(3))


def test_resume_without_a_finished_epoch_says_so(tmp_path):
    cfg = toy_config()
    with pytest.raises(RunError, match="before writing its first checkpoint"):
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


def test_bf16_autocast_trains_close_to_fp32_but_not_bit_for_bit(tmp_path):
    runs_by = {}
    for precision in ("fp32", "bf16"):
        cfg = toy_config(epochs=3, precision=precision)
        runs_by[precision] = fit(build(cfg.model, seed=0), cfg, toy_splits(), None, progress=False)
    bf16, fp32 = runs_by["bf16"], runs_by["fp32"]
    assert bf16[-1]["valid_nelbo"] < bf16[0]["valid_nelbo"]  # it learns
    assert bf16[-1]["train_loss"] != fp32[-1]["train_loss"]  # the matmuls did run in bf16
    assert abs(bf16[-1]["valid_nelbo"] - fp32[-1]["valid_nelbo"]) < 1.0
    json.dumps(bf16)  # plain floats only


def _weights_equal(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_seconds(ms):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in ms]


def _patch_elbo(monkeypatch, on_train_step):
    """Replace the objective the loop calls; ``on_train_step(n, parts)`` sees the n-th training call (1-based)."""
    real, calls = train.elbo, [0]

    def patched(model, x, **kw):
        parts = real(model, x, **kw)
        if not model.training:  # validation passes are left alone
            return parts
        calls[0] += 1
        return on_train_step(calls[0], parts)

    monkeypatch.setattr(train, "elbo", patched)


def _state_meta(run):
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["state"]), set(f.keys())


# 200 training images in batches of 32: 7 steps an epoch, 21 in all; checkpoints at global steps 3, 6, 9, ...
@pytest.mark.parametrize("binarize, crash_step, last_ckpt, ema", [
    ("dynamic", 11, (1, 2), 0.0),  # epoch 2 checkpointed after its 2nd step (global step 9)
    ("static", 16, (2, 1), 0.0),  # epoch 3 after its 1st step (global step 15)
    ("none", 13, (1, 5), 0.0),  # epoch 2 after its 5th step (global step 12)
    ("dynamic", 11, (1, 2), 0.8),  # and the moving average of the weights goes on from where it was
])
def test_mid_epoch_resume_is_bitwise_exact(tmp_path, monkeypatch, binarize, crash_step, last_ckpt, ema):
    splits = toy_splits()
    cfg = toy_config(epochs=3, ema=ema).replace(data={"binarize": binarize})
    straight = fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "straight", progress=False)

    cfg = cfg.replace(train={"checkpoint_every": 3})
    run = tmp_path / "broken"

    def crash(n, parts):
        if n == crash_step:
            raise Crash
        return parts

    _patch_elbo(monkeypatch, crash)
    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), cfg, splits, run, progress=False)
    monkeypatch.undo()
    state, keys = _state_meta(run)
    assert (state["epoch"], state["part"]["index"]) == last_ckpt
    assert {"epoch.order", "epoch.sums"} <= keys

    torch.manual_seed(12345)  # resume must not depend on the global RNG
    resumed = fit(build(cfg.model, seed=7), cfg, splits, run, resume=True, progress=False)
    assert _without_seconds(resumed) == _without_seconds(straight)
    assert _without_seconds(runs.read_jsonl(run / "metrics.jsonl")) == _without_seconds(straight)
    for name in ("last.safetensors", "model.safetensors"):
        assert _weights_equal(tmp_path / "straight" / name, run / name)
    assert "part" not in _state_meta(run)[0]  # the finished run's checkpoint is an epoch boundary


def test_checkpoint_every_step_changes_nothing_but_the_files(tmp_path):
    splits = toy_splits()
    cfg = toy_config(epochs=2)
    a = fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "a", progress=False)
    every_step = cfg.replace(train={"checkpoint_every": 1})
    b = fit(build(cfg.model, seed=0), every_step, splits, tmp_path / "b", progress=False)
    assert _without_seconds(a) == _without_seconds(b)
    assert _weights_equal(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert not any(runs.is_temp_file(p) for p in (tmp_path / "b").iterdir())


def test_part_epoch_checkpoint_refuses_another_batch_size(tmp_path, monkeypatch):
    cfg = toy_config(epochs=2, checkpoint_every=2)

    def crash(n, parts):
        if n == 4:
            raise Crash
        return parts

    _patch_elbo(monkeypatch, crash)
    with pytest.raises(Crash):
        fit(build(cfg.model), cfg, toy_splits(), tmp_path, progress=False)
    monkeypatch.undo()
    other = cfg.replace(train={"batch_size": 16})
    with pytest.raises(RunError, match=r"batch size 32 .* batch size 16"):
        fit(build(other.model), other, toy_splits(), tmp_path, resume=True, progress=False)


def test_a_few_non_finite_steps_are_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    cfg = toy_config(epochs=3)  # 7 steps an epoch
    bad = {3, 10}  # the 3rd step of epoch 1 and the 3rd of epoch 2

    def nan_loss(n, parts):
        return parts._replace(loss=parts.loss * float("nan")) if n in bad else parts

    _patch_elbo(monkeypatch, nan_loss)
    model = build(cfg.model)
    metrics = fit(model, cfg, toy_splits(), tmp_path, progress=False)
    assert [m["skipped_steps"] for m in metrics] == [1, 1, 0]
    assert [m["step"] for m in metrics] == [7, 14, 21]
    assert _state_meta(tmp_path)[0]["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "last.safetensors")).values())
    assert all(torch.isfinite(torch.tensor(m["train_nelbo"])) for m in metrics)
    # Adam took exactly the 19 good steps: the skipped ones never reached the optimizer.
    adam_steps = {k: v for k, v in load_file(str(tmp_path / "state.safetensors")).items() if k.endswith(".step")}
    assert adam_steps and all(v.item() == 19 for v in adam_steps.values())


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    cfg = toy_config(epochs=3)
    fit(build(cfg.model), cfg.replace(train={"epochs": 1}), toy_splits(), tmp_path, progress=False)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = runs.atomic_write

    def half_then_enospc(path, write):
        def writer(p):
            write(p)
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, writer if path.name == "state.safetensors" else write)

    monkeypatch.setattr(runs, "atomic_write", half_then_enospc)
    with pytest.raises(RunError) as e:
        fit(build(cfg.model), cfg, toy_splits(), tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    msg = str(e.value)
    assert "disk is full" in msg and "epoch 1" in msg and f"vaekit train --out {tmp_path} --resume" in msg
    assert (tmp_path / "state.safetensors").read_bytes() == good["state.safetensors"]
    assert not any(runs.is_temp_file(p) for p in tmp_path.iterdir())
    assert _state_meta(tmp_path)[0]["epoch"] == 1


@pytest.mark.parametrize("train", [
    {"objective": "iwae", "k": 5},
    {"warmup_steps": 10, "free_bits": 0.1, "lr_schedule": "cosine", "lr_min": 1e-4},
    {"output_bias": "data", "adam_eps": 1e-4},  # a resumed run must not fit the bias again
    {"ema": 0.9},  # the saved weights are the average: the resumed run must carry it on, not restart it
])
def test_objective_options_train_and_resume_exactly(tmp_path, train):
    cfg = toy_config(epochs=2, **train)
    splits = toy_splits()
    metrics = fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "a", progress=False)
    assert metrics[-1]["valid_nelbo"] < metrics[0]["valid_nelbo"] + 0.5

    def crash(record):
        raise Crash

    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "b", progress=False, on_epoch=crash)
    fit(build(cfg.model, seed=0), cfg, splits, tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("output_bias", ["zero", "data"])
def test_output_bias_data_starts_p_x_at_the_mean_training_image(tmp_path, output_bias):
    # lr 1e-9: Adam moves each weight by at most about 1e-9 a step, so the bias stays where it started
    cfg = toy_config(epochs=1, lr=1e-9, output_bias=output_bias)
    splits = toy_splits()
    model = build(cfg.model, seed=0)
    fit(model, cfg, splits, tmp_path, progress=False)
    mean = splits.train.x.double().mean(0).flatten() / 255  # dynamic binarization: a pixel's mean is its grey
    want = torch.logit(mean.clamp(1e-3, 1 - 1e-3)).float() if output_bias == "data" else torch.zeros_like(mean).float()
    torch.testing.assert_close(model.output_layer.bias.detach(), want, rtol=0, atol=1e-6)


def test_adam_eps_reaches_the_optimizer(tmp_path):
    """Adam's step is lr·m/(√v + ε): an ε far above √v shrinks every step, so the weights move less."""
    moved = {}
    for eps in (1e-8, 10.0):
        cfg = toy_config(epochs=1, adam_eps=eps)
        model = build(cfg.model, seed=0)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        fit(model, cfg, toy_splits(), tmp_path / str(eps), progress=False)
        moved[eps] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm().item()
    assert moved[10.0] < moved[1e-8] / 10


def test_warmup_and_cosine_schedule_values():
    from vaekit.train import lr_schedule, objective

    cfg = toy_config(warmup_steps=4, lr_schedule="cosine", lr_min=0.1, lr=1.0, beta=4.0)
    sched = lr_schedule(cfg.train, 100)
    # lr_min + (lr − lr_min)(1 + cos(π t/T))/2, held at lr_min after T
    assert sched(0) == pytest.approx(1.0) and sched(50) == pytest.approx(0.55)
    assert sched(100) == pytest.approx(0.1) and sched(150) == pytest.approx(0.1)
    assert lr_schedule(toy_config().train, 100) is None
    model = build(cfg.model, seed=0)
    x = toy_splits().train.float()[:8].round()
    for step, beta in [(0, 1.0), (1, 2.0), (3, 4.0), (10, 4.0)]:  # β = 4, reached over 4 steps
        torch.manual_seed(0)
        parts = objective(model, x, cfg.train, step)
        torch.testing.assert_close(parts.loss, parts.distortion + beta * parts.rate)


def test_a_beta_vae_trains_on_distortion_plus_beta_times_the_rate(tmp_path):
    cfg = toy_config(epochs=1, beta=4.0)
    (m,) = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, progress=False)
    assert m["train_kl"] > 0.1
    assert m["train_loss"] == pytest.approx(m["train_recon"] + 4 * m["train_kl"], rel=1e-6)
    assert m["train_nelbo"] == pytest.approx(m["train_recon"] + m["train_kl"], rel=1e-6)


def test_iwae_runs_pick_their_best_epoch_by_the_validation_bound(tmp_path):
    cfg = toy_config(epochs=3, objective="iwae", k=4)
    metrics = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, progress=False)
    for m in metrics:
        assert m["valid_iwae_loss"] <= m["valid_nelbo"] + 1e-6  # −L_k ≤ −ELBO on the same images
        assert m["train_loss"] <= m["train_nelbo"] + 1e-6  # −L_k ≤ the k-sample average −ELBO
    state = _state_meta(tmp_path)[0]
    best = min(metrics, key=lambda m: m["valid_iwae_loss"])
    assert state["best_epoch"] == best["epoch"]
    assert state["best_score"] == pytest.approx(best["valid_iwae_loss"])


@pytest.mark.parametrize("train", [{}, {"objective": "iwae", "k": 1, "dreg": True}])
def test_elbo_runs_record_no_iwae_bound(tmp_path, train):
    """Nor does IWAE at k = 1 ("sticking the landing" with dreg): L_1 is the ELBO, chosen by its closed form."""
    cfg = toy_config(epochs=1, **train)
    (m,) = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, progress=False)
    assert "valid_iwae_loss" not in m
    if not train:
        assert m["train_loss"] == pytest.approx(m["train_nelbo"])


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    eager = fit(build(toy_config().model, seed=0), toy_config(epochs=1), toy_splits(), tmp_path / "a", progress=False)
    with pytest.warns(UserWarning, match="no compiler here"):
        fallback = fit(build(toy_config().model, seed=0), toy_config(epochs=1, compile=True), toy_splits(),
                       tmp_path / "b", progress=False)
    assert _without_seconds(fallback) == _without_seconds(eager)  # the probe used no randomness


def test_dreg_changes_the_training(tmp_path):
    """The DReG estimator reaches training (other weights than plain IWAE from the same seed)."""
    iw = {"objective": "iwae", "k": 4, "epochs": 1}
    models = {d: build(toy_config(**iw).model, seed=0) for d in ("plain", "dreg")}
    plain = fit(models["plain"], toy_config(**iw), toy_splits(), tmp_path / "a", progress=False)
    dreg = fit(models["dreg"], toy_config(**iw, dreg=True), toy_splits(), tmp_path / "b", progress=False)
    assert plain[0]["valid_iwae_loss"] != dreg[0]["valid_iwae_loss"]
    enc = {n: p for n, p in models["dreg"].named_parameters() if n.startswith("encoder")}
    dec = {n: p for n, p in models["dreg"].named_parameters() if n.startswith("decoder")}
    other = dict(models["plain"].named_parameters())
    assert all(not torch.equal(p, other[n]) for n, p in enc.items())
    assert all(not torch.equal(p, other[n]) for n, p in dec.items())  # the decoder follows a different encoder


@pytest.mark.slow
@pytest.mark.parametrize("grad_samples", [0, 2])
def test_compiled_dreg_training_matches_eager(tmp_path, grad_samples):
    """--compile with dreg compiles the whole step (objectives.dreg_from_noise, DReG's
    reweighting without a hook), with or without grad_samples: the same training as eager DReG
    up to float rounding (the same random numbers, drawn in the same order), and not plain IWAE's."""
    iw = {"objective": "iwae", "k": 4, "epochs": 2}
    plain = fit(build(toy_config(**iw).model, seed=0), toy_config(**iw), toy_splits(), None, progress=False)
    dreg = {"dreg": True, "grad_samples": grad_samples}
    eager = fit(build(toy_config(**iw).model, seed=0), toy_config(**iw, **dreg), toy_splits(), None, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fit(build(toy_config(**iw).model, seed=0), toy_config(**iw, **dreg, compile=True), toy_splits(),
                       None, progress=False)
    assert not [w for w in caught if "--compile" in str(w.message)], "it fell back to eager: nothing was compiled"
    for p, a, b in zip(plain, eager, compiled):
        assert b["valid_iwae_loss"] == pytest.approx(a["valid_iwae_loss"], abs=1e-3)
        assert abs(b["valid_iwae_loss"] - p["valid_iwae_loss"]) > 10 * abs(b["valid_iwae_loss"] - a["valid_iwae_loss"])


def test_the_compiled_training_path_computes_what_eager_does(monkeypatch):
    """--compile without the compiler (torch.compile as the identity): the compiled path's own
    plumbing (β as a tensor through the warm-up, the compile-time trial step with its forked
    random state) trains exactly as eager does. The slow test below compiles for real."""
    cfg = toy_config(epochs=2, warmup_steps=5)
    eager = fit(build(cfg.model, seed=0), cfg, toy_splits(), None, progress=False)
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    compiled = fit(build(cfg.model, seed=0), toy_config(epochs=2, warmup_steps=5, compile=True), toy_splits(),
                   None, progress=False)
    for a, b in zip(eager, compiled, strict=True):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    cfg = toy_config(epochs=2, warmup_steps=5)
    eager = fit(build(cfg.model, seed=0), cfg, toy_splits(), None, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fit(build(cfg.model, seed=0), toy_config(epochs=2, warmup_steps=5, compile=True), toy_splits(),
                       None, progress=False)
    assert not [w for w in caught if "--compile" in str(w.message)], "it fell back to eager: nothing was compiled"
    for a, b in zip(eager, compiled):
        assert b["valid_nelbo"] == pytest.approx(a["valid_nelbo"], abs=1e-2)


def test_a_run_keeps_its_matmul_path_when_resumed(tmp_path, monkeypatch):
    """The oneDNN/MKL choice is timed once per run and stored, so a resume computes the same way."""
    monkeypatch.setattr(train, "prefer_onednn", lambda device, batch_size: True)
    cfg = toy_config(epochs=2)

    def crash(record):
        raise Crash

    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, progress=False, on_epoch=crash)
    assert _state_meta(tmp_path)[0]["onednn_fp32"] == train._onednn_keeps_fp32()

    def must_not_be_asked(device, batch_size):
        raise AssertionError("a resumed run re-chose its matmul path")

    monkeypatch.setattr(train, "prefer_onednn", must_not_be_asked)
    seen = []
    monkeypatch.setattr(train, "onednn_fp32_matmuls", lambda: seen.append(1) or train.nullcontext())
    fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, resume=True, progress=False)
    assert bool(seen) == train._onednn_keeps_fp32()


def test_a_checkpoint_from_before_best_score_was_named_resumes_as_before(tmp_path):
    from safetensors.torch import save_file

    splits, one, two = toy_splits(), toy_config(epochs=1), toy_config(epochs=2)
    straight = fit(build(two.model, seed=0), two, splits, tmp_path / "straight", progress=False)
    old = tmp_path / "old"
    fit(build(one.model, seed=0), one, splits, old, progress=False)
    with safe_open(str(old / "state.safetensors"), framework="pt") as f:  # write it as older versions did
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    state["best_valid_nelbo"] = state.pop("best_score")
    save_file(tensors, str(old / "state.safetensors"), metadata={**meta, "state": json.dumps(state)})
    resumed = fit(build(two.model, seed=3), two, splits, old, resume=True, progress=False)
    assert _without_seconds(resumed) == _without_seconds(straight)
    assert _state_meta(old)[0] == _state_meta(tmp_path / "straight")[0]


def test_kl_warm_up_reaches_iwae_training(tmp_path):
    """β (and so --warmup) weights log p(z) − log q(z|x) in IWAE's weights; once, it was silently ignored."""
    splits = toy_splits()
    plain = fit(build(toy_config().model, seed=0), toy_config(epochs=1, objective="iwae", k=3), splits, None,
                progress=False)
    warm = fit(build(toy_config().model, seed=0), toy_config(epochs=1, objective="iwae", k=3, warmup_steps=50),
               splits, None, progress=False)
    assert warm[0]["train_loss"] < plain[0]["train_loss"] - 0.1  # β < 1 all epoch: a smaller loss (equal if ignored)
    assert warm[0]["valid_iwae_loss"] != plain[0]["valid_iwae_loss"]


def test_k_start_trains_the_first_epochs_with_fewer_samples(tmp_path, monkeypatch):
    """k_start samples per image for the first k_start_epochs epochs, then k; validation always uses k."""
    cfg = toy_config(epochs=3, objective="iwae", k=4, k_start=2, k_start_epochs=2)
    steps = -(-200 // 32)  # 200 training images, batch 32
    seen = []
    real = train.iwae
    monkeypatch.setattr(train, "iwae", lambda model, x, k, *a, **kw: seen.append((k, model.training)) or
                        real(model, x, k, *a, **kw))
    schedule = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path, progress=False)
    trained = [k for k, training in seen if training]
    assert trained == [2] * 2 * steps + [4] * steps
    assert {k for k, training in seen if not training} == {4}  # the validation −L_k of every epoch
    # The first epochs are those of a k = 2 run, to the bit: the same samples, the same updates.
    two = fit(build(cfg.model, seed=0), toy_config(epochs=3, objective="iwae", k=2), toy_splits(), None,
              progress=False)
    assert [m["train_loss"] for m in schedule[:2]] == [m["train_loss"] for m in two[:2]]
    assert schedule[2]["train_loss"] != two[2]["train_loss"]

    # A run stopped inside the cheap start resumes with k_start, then goes on with k.
    again = _stopped_and_resumed(cfg, tmp_path / "resumed", after_epoch=1)
    assert _without_seconds(again) == _without_seconds(schedule)


def test_grad_samples_thin_the_epochs_at_k_only_and_resume_exactly(tmp_path, monkeypatch):
    """The cheap start's few samples all get a backward pass; the epochs at k use grad_samples, and a
    run stopped between them resumes to the same numbers (the subsets are drawn from the saved RNG)."""
    cfg = toy_config(epochs=3, objective="iwae", k=4, k_start=2, k_start_epochs=1, dreg=True, grad_samples=2)
    seen, real = [], train.iwae
    monkeypatch.setattr(train, "iwae", lambda model, x, k, *a, **kw: (model.training and seen.append(
        (k, kw["grad_samples"]))) or real(model, x, k, *a, **kw))
    whole = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path / "whole", progress=False)
    steps = -(-200 // 32)
    assert seen == [(2, 0)] * steps + [(4, 2)] * 2 * steps
    dense = fit(build(cfg.model, seed=0), cfg.replace(train={"grad_samples": 0}), toy_splits(), None, progress=False)
    assert whole[0]["train_loss"] == dense[0]["train_loss"]  # the cheap start is untouched
    assert whole[2]["valid_iwae_loss"] != dense[2]["valid_iwae_loss"]  # the thinned epochs train differently

    again = _stopped_and_resumed(cfg, tmp_path / "resumed", after_epoch=2)
    assert _without_seconds(again) == _without_seconds(whole)


def _stopped_and_resumed(cfg, run, after_epoch: int) -> list[dict]:
    """Train cfg into run, stop it right after epoch after_epoch, resume it (from another seed's
    weights, which the checkpoint replaces) and return the resumed run's metrics."""
    def crash(record):
        if record["epoch"] == after_epoch:
            raise Crash

    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), cfg, toy_splits(), run, progress=False, on_epoch=crash)
    return fit(build(cfg.model, seed=5), cfg, toy_splits(), run, resume=True, progress=False)


def _record_iwae(monkeypatch, crash_at=None):
    """Log (k, batch size, β) of each training call of iwae; raise Crash on the crash_at-th (1-based)."""
    seen, real = [], train.iwae

    def patched(model, x, k, *a, **kw):
        if model.training:
            seen.append((k, len(x), float(kw["beta"])))
            if len(seen) == crash_at:
                raise Crash
        return real(model, x, k, *a, **kw)

    monkeypatch.setattr(train, "iwae", patched)
    return seen


def _record_schedule(monkeypatch):
    """Log the position each step asks the lr schedule for."""
    at, real = [], train.lr_schedule

    def patched(tc, total):
        f = real(tc, total)
        return lambda t: at.append(t) or f(t)

    monkeypatch.setattr(train, "lr_schedule", patched)
    return at


def test_k_start_batch_size_moves_the_schedules_by_examples_seen(tmp_path, monkeypatch):
    """k_start_batch_size: the cheap start trains in batches of its own; the lr schedule and the KL
    warm-up, counted in steps of batch_size, advance one epoch's worth over each epoch either way."""
    cfg = toy_config(epochs=4, objective="iwae", k=4, k_start=2, k_start_epochs=2, k_start_batch_size=16,
                     batch_size=8, lr_schedule="cosine", warmup_steps=50)  # 200 images: 25 steps of 8 an epoch
    seen, at = _record_iwae(monkeypatch), _record_schedule(monkeypatch)
    straight = fit(build(cfg.model, seed=0), cfg, toy_splits(), tmp_path / "straight", progress=False)
    cheap = [16] * 12 + [8]  # 200 = 12 × 16 + 8
    assert [(k, b) for k, b, _ in seen] == [(2, b) for b in cheap * 2] + [(4, 8)] * 50
    assert [m["step"] for m in straight] == [13, 26, 51, 76]
    want = [e * 25 + i * 25 / 13 for e in (0, 1) for i in range(13)] + list(range(50, 100))
    assert at == pytest.approx(want, abs=1e-12)
    assert [beta for *_, beta in seen] == pytest.approx([min(1.0, (t + 1) / 50) for t in want])
    assert seen[25][2] < 1.0 == seen[26][2]  # the warm-up of 2 epochs ends with the cheap start

    # Without it the positions are the steps themselves, as they were before the option existed.
    at.clear()
    fit(build(cfg.model, seed=0), cfg.replace(train={"k_start_batch_size": 0}), toy_splits(), None, progress=False)
    assert at == list(range(100)) and all(type(t) is int for t in at)

    # Runs stopped part-way through an epoch of either batch size resume to the bit.
    for crash_at, last in [(8, (0, 5)), (33, (2, 4))]:  # checkpoints every 5 steps: 5, 10, 13|15, ..., 26|30
        monkeypatch.undo()
        _record_iwae(monkeypatch, crash_at)
        run, every = tmp_path / f"crash{crash_at}", cfg.replace(train={"checkpoint_every": 5})
        with pytest.raises(Crash):
            fit(build(cfg.model, seed=0), every, toy_splits(), run, progress=False)
        monkeypatch.undo()
        state, _ = _state_meta(run)
        assert (state["epoch"], state["part"]["index"]) == last
        resumed = fit(build(cfg.model, seed=3), every, toy_splits(), run, resume=True, progress=False)
        assert _without_seconds(resumed) == _without_seconds(straight)

    # ...and refuse a changed k_start_batch_size in the middle of the cheap start.
    _record_iwae(monkeypatch, 8)
    run = tmp_path / "changed"
    with pytest.raises(Crash):
        fit(build(cfg.model, seed=0), every, toy_splits(), run, progress=False)
    monkeypatch.undo()
    other = every.replace(train={"k_start_batch_size": 12})
    with pytest.raises(RunError, match=r"batch size 16 .* batch size 12"):
        fit(build(cfg.model), other, toy_splits(), run, resume=True, progress=False)


def test_ema_validates_and_saves_the_moving_average_and_leaves_training_alone(tmp_path):
    """train.ema = d: after steps with weights θ1, θ2, ... the average is θ1, then d·avg + (1 − d)·θ."""
    splits = toy_splits()
    one_step = {"epochs": 3, "batch_size": 200}  # 200 training images: one step an epoch
    cfg, d = toy_config(**one_step), 0.7
    raw = build(cfg.model, seed=0)
    seen = []
    plain = fit(raw, cfg, splits, None, progress=False,
                on_epoch=lambda r: seen.append({k: v.clone() for k, v in raw.state_dict().items()}))
    want = seen[0]
    for weights in seen[1:]:
        want = {k: d * want[k] + (1 - d) * weights[k] for k in want}

    model = build(cfg.model, seed=0)
    averaged = fit(model, toy_config(**one_step, ema=d), splits, tmp_path, progress=False)
    # Training is untouched: the same losses, and the model ends with the same raw weights.
    assert [m["train_loss"] for m in averaged] == [m["train_loss"] for m in plain]
    assert all(torch.equal(v, seen[-1][k]) for k, v in model.state_dict().items())
    saved = load_file(str(tmp_path / "last.safetensors"))
    assert saved.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(saved[k], want[k])
    assert any(not torch.allclose(saved[k], seen[-1][k]) for k in want)  # the average, not the last weights
    # The epoch is judged by the average: its validation −ELBO is the average's.
    judge = build(cfg.model)
    judge.load_state_dict(saved)
    x_valid = train.eval_set(splits.valid, cfg.data)
    assert averaged[-1]["valid_nelbo"] == pytest.approx(
        train.elbo_means(judge, x_valid, cfg.train.eval_batch_size, seed=cfg.train.seed)["nelbo"], rel=1e-6)
    assert averaged[-1]["valid_nelbo"] != pytest.approx(plain[-1]["valid_nelbo"], rel=1e-6)


@pytest.mark.parametrize("binarize", ["dynamic", "static", "none"])
def test_what_each_binarization_feeds_the_model(binarize, monkeypatch):
    # 32 copies of one grey image, one batch an epoch: the order of the batch cannot matter
    grey = torch.linspace(0.2, 0.8, 36).view(1, 1, 6, 6)
    ds = Dataset((grey.expand(32, 1, 6, 6) * 255).round().to(torch.uint8), None, "grey")
    splits = Splits(ds, ds.take(slice(0, 8)), None)
    seen = []
    real = train.elbo
    def recording(model, x, **kw):
        if len(x) == 32:  # a training batch (validation has 8)
            seen.append(x.clone())
        return real(model, x, **kw)

    monkeypatch.setattr(train, "elbo", recording)
    cfg = RunConfig.from_dict({"model": {"latent_dim": 2, "hidden": [8], "input_shape": [1, 6, 6]},
                               "data": {"source": "grey", "binarize": binarize},
                               "train": {"epochs": 2, "batch_size": 32}})
    fit(build(cfg.model), cfg, splits, None, progress=False)
    first, second = seen
    scaled = ds.x[:1].float() / 255
    if binarize == "none":  # grey values in [0, 1], the same each epoch
        torch.testing.assert_close(first, scaled.expand_as(first))
        assert torch.equal(second, first)
        return
    assert set(first.unique().tolist()) == {0.0, 1.0}
    # each pixel is on about as often as its grey value says (32 draws of 36 pixels)
    assert (first.mean(0) - scaled[0]).abs().mean() < 0.1
    rows = [sorted(map(tuple, batch.flatten(1).tolist())) for batch in (first, second)]  # in any order
    if binarize == "static":  # one draw per image, kept: the same 32 images, shuffled
        assert rows[0] == rows[1] and not torch.equal(first[0], first[1])
    else:  # a fresh draw each time an image is used
        assert rows[0] != rows[1]


def test_a_non_finite_validation_score_ranks_last():
    from vaekit.train import selection_score

    assert selection_score({"valid_nelbo": 90.0, "valid_iwae_loss": 88.0}) == 88.0
    for bad in (float("nan"), None, float("inf")):  # NaN in memory is null once read back from metrics.jsonl
        assert selection_score({"valid_nelbo": bad}) == math.inf
    records = [{"epoch": 1, "valid_nelbo": float("nan")}, {"epoch": 2, "valid_nelbo": 95.0}]
    assert min(records, key=selection_score)["epoch"] == 2


def test_fit_writes_a_run_that_load_rebuilds_and_checks_its_data(tmp_path):
    cfg = toy_config(epochs=1)
    model = build(cfg.model, seed=0)
    fit(model, cfg, toy_splits(), str(tmp_path / "run"), progress=False)  # a str path is fine
    assert runs.load_config(tmp_path / "run") == cfg
    other = cfg.replace(model={"activation": "tanh"})  # trained anew into the same folder: its config goes too
    fit(build(other.model, seed=0), other, toy_splits(), tmp_path / "run", progress=False)
    assert runs.load_config(tmp_path / "run") == other
    fit(model, cfg, toy_splits(), tmp_path / "run", progress=False)
    loaded = vaekit.load(tmp_path / "run", which="last")
    x = toy_splits().valid.float()
    assert torch.equal(loaded.encode(x).mean, model.eval().encode(x).mean)
    splits = toy_splits()
    scaled = Splits(Dataset(splits.train.float() * 255, None, "toy-255"), splits.valid, None)
    with pytest.raises(DataError, match="values range from 0 to 2"):
        fit(build(cfg.model), cfg, scaled, progress=False)  # Bernoulli: [0, 1] only
    with pytest.warns(UserWarning, match="cfg.data.source is 'mnist'"):
        fit(build(cfg.model), cfg.replace(data={"source": "mnist"}), splits, progress=False)
