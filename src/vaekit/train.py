"""A plain, linear training loop with checkpoints and exact resume.

Nothing here knows which model it trains: it needs `objectives.elbo(model, x)`.
In-memory data stays one tensor (uint8 stays uint8 until the batch); batches are
taken by index with a seeded generator and binarized on the fly; gradients are
set to None; the running sums stay on the device and are read only when the
progress bar is refreshed.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vaekit import runs
from vaekit.config import DataConfig, RunConfig
from vaekit.data import Dataset, Splits, binarize
from vaekit.errors import RunError
from vaekit.objectives import elbo

MAX_CONSECUTIVE_SKIPS = 20  # non-finite steps in a row before training gives up
BAR_EVERY = 25  # steps between progress-bar refreshes (each refresh reads the device)


@dataclass(frozen=True)
class TrainSet:
    """Training images as stored, plus how to turn a batch of them into model input."""

    x: torch.Tensor  # (N, *shape), uint8 or float32, on the training device
    scale: float  # batch = x[idx].float() * scale
    dynamic: bool  # draw a fresh Bernoulli sample every time an image is used


def train_set(ds: Dataset, data: DataConfig, device: torch.device) -> TrainSet:
    scale = 1 / 255 if ds.x.dtype == torch.uint8 else 1.0
    if data.binarize == "static":
        # Drawn once with the recorded seed; stored as uint8 0/1 to keep memory small.
        g = torch.Generator().manual_seed(data.binarize_seed)
        return TrainSet(binarize(ds.float(), g).to(torch.uint8).to(device), 1.0, False)
    return TrainSet(ds.x.to(device), scale, data.binarize == "dynamic")


def eval_set(ds: Dataset, data: DataConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluation images as float32: binarized ONCE with the recorded seed unless binarize='none'.

    This fixes the protocol: two evaluations of one model on one split see the same pixels.
    """
    x = ds.float()
    if data.binarize != "none":
        x = binarize(x, torch.Generator().manual_seed(data.binarize_seed))
    return x.to(device)


@torch.no_grad()
def elbo_means(model, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean negative ELBO and its parts (nats per example) over x, with a fixed noise seed."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            parts = elbo(model, x[i : i + batch_size])
            totals += torch.stack([parts.distortion.sum(), parts.rate.sum()]).double().cpu()
    model.train(was_training)
    recon, kl = (totals / len(x)).tolist()
    return {"nelbo": recon + kl, "recon": recon, "kl": kl}


def _rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state(), "rng.data": gen.get_state()}


def save_state(run: Path, model, opt, gen: torch.Generator, state: dict) -> None:
    """Everything needed to continue exactly, in ONE atomically written file.

    state.safetensors holds the weights, optimizer moments and RNG streams as tensors and
    the counters plus optimizer hyper-parameters as JSON in its metadata, so a crash can
    never leave tensors and counters from different epochs.
    """
    tensors, opt_meta = runs.optimizer_tensors(opt)
    tensors.update(_rng_tensors(gen))
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    meta = {"state": json.dumps(state), "optimizer": json.dumps(opt_meta)}
    runs.save_tensors(run / "state.safetensors", tensors, meta)
    runs.save_weights(run / "last.safetensors", model)


def load_state(run: Path, model, opt, gen: torch.Generator) -> dict:
    path = run / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(runs.optimizer_state_dict(tensors, json.loads(meta["optimizer"])))
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    return json.loads(meta["state"])


def fit(
    model,
    cfg: RunConfig,
    splits: Splits,
    run: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` as ``cfg.train`` says; checkpoint into ``run`` each epoch; return the metrics."""
    tc = cfg.train
    device = next(model.parameters()).device
    data = train_set(splits.train, cfg.data, device)
    x_valid = eval_set(splits.valid, cfg.data, device)
    n = len(data.x)
    steps_per_epoch = math.ceil(n / tc.batch_size)

    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, foreach=True)
    gen = torch.Generator().manual_seed(tc.seed)  # data order and binarization draws
    state = {"epoch": 0, "step": 0, "best_epoch": None, "best_valid_nelbo": None, "skipped_steps": 0}
    metrics: list[dict] = []
    if resume:
        if run is None or not (run / "state.safetensors").is_file():
            raise RunError(f"nothing to resume in {run}: no epoch finished before it stopped; start it again.")
        state = load_state(run, model, opt, gen)
        # Drop metrics of an epoch that was logged but not checkpointed before a crash.
        metrics = [m for m in runs.read_jsonl(run / "metrics.jsonl") if m["epoch"] <= state["epoch"]]
        runs.write_text(run / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    else:
        torch.manual_seed(tc.seed)  # the reparameterization noise

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()
    )
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
    skipped_in_a_row = 0
    model.train()
    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        t0 = time.perf_counter()
        sums = torch.zeros(3, device=device)  # recon, kl, examples
        skipped = 0
        order = torch.randperm(n, generator=gen).to(device)
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch}/{tc.epochs}", disable=not progress, leave=False, unit="step"
        )
        for i in range(steps_per_epoch):
            idx = order[i * tc.batch_size : (i + 1) * tc.batch_size]
            xb = data.x[idx].float().mul_(data.scale)  # (B, *shape) in [0, 1]
            if data.dynamic:
                xb = torch.bernoulli(xb, generator=gen if xb.device.type == "cpu" else None)
            with autocast:
                parts = elbo(model, xb, beta=tc.beta)
            loss = parts.loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip else None
            )
            # A non-finite loss or gradient skips the update (vdvae's training_step does the same).
            finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss + grad_norm)
            if not finite:
                skipped += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    bar.close()
                    raise RunError(
                        f"training diverged: {skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(epoch {epoch}). The last good checkpoint is intact; lower --lr or set a gradient clip."
                    )
                continue
            skipped_in_a_row = 0
            opt.step()
            sums += torch.stack([parts.distortion.detach().sum(), parts.rate.detach().sum(), loss.new_tensor(len(xb))])
            if (i + 1) % BAR_EVERY == 0 or i + 1 == steps_per_epoch:
                r, k, m = sums.tolist()
                bar.set_postfix(nelbo=f"{(r + k) / max(m, 1):.2f}", refresh=False)
                bar.update((i + 1) - bar.n)
        bar.close()
        r, k, m = sums.tolist()
        valid = elbo_means(model, x_valid, tc.eval_batch_size, seed=tc.seed)
        state["step"] += steps_per_epoch
        state["skipped_steps"] += skipped
        state["epoch"] = epoch
        record = {
            "epoch": epoch,
            "step": state["step"],
            "train_nelbo": (r + k) / max(m, 1),
            "train_recon": r / max(m, 1),
            "train_kl": k / max(m, 1),
            **{f"valid_{key}": value for key, value in valid.items()},
            "skipped_steps": skipped,
            "seconds": time.perf_counter() - t0,
        }
        improved = state["best_valid_nelbo"] is None or valid["nelbo"] < state["best_valid_nelbo"]
        if improved:
            state["best_valid_nelbo"], state["best_epoch"] = valid["nelbo"], epoch
        metrics.append(record)
        if run is not None:
            if improved:
                runs.save_weights(run / "model.safetensors", model)
            runs.append_jsonl(run / "metrics.jsonl", record)
            save_state(run, model, opt, gen, state)
        if on_epoch is not None:
            on_epoch(record)
    return metrics
