"""A plain, linear training loop with checkpoints and exact resume.

Nothing here knows which model it trains: it needs `objectives.elbo(model, x)`.
In-memory data stays one tensor (uint8 stays uint8 until the batch); batches are
taken by index with a seeded generator and binarized on the fly; gradients are
set to None; the running sums stay on the device and are read only when the
progress bar is refreshed.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vaekit import runs
from vaekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaekit.cpu import flush_denormals, keep_freed_memory
from vaekit.data import Dataset, Splits, binarize, binarize_u8, check_unit_range, fingerprint
from vaekit.distributions import noise_drawer, seeded
from vaekit.errors import ConfigError, DataError, RunError
from vaekit.models.common import fit_output_bias_
from vaekit.objectives import dreg_from_noise, elbo, encode, iwae, norm_penalty

MAX_CONSECUTIVE_SKIPS = 20  # non-finite steps in a row before training gives up
BAR_EVERY = 25  # steps between progress-bar refreshes (each refresh reads the device)
STREAM_WORKERS = 2  # DataLoader processes reading the batches of a streamed data set
STREAM_ROWS = 4096  # examples a loader worker reads and hands over at a time


@dataclass(frozen=True)
class TrainSet:
    """Training images as stored, plus how to turn a batch of them into model input."""

    x: torch.Tensor  # (N, *shape), uint8 or float32, on the training device; streamed: the mapped file, on the CPU
    scale: float  # batch = x[idx].float() * scale
    dynamic: bool  # draw a fresh Bernoulli sample every time an image is used
    y: torch.Tensor | None = None  # (N,) labels on the device, kept only for a conditional model
    rows: torch.Tensor | None = None  # streamed: the training examples' rows of x (see data.Dataset)
    source: Path | None = None  # streamed: the .npy file x maps, reopened by each loader worker

    def __len__(self) -> int:
        return len(self.x) if self.rows is None else len(self.rows)

    def first(self, n: int) -> torch.Tensor:
        """The first n examples as stored."""
        return self.x[:n] if self.rows is None else self.x[self.rows[:n]]

    def mean(self, chunk: int = 10_000) -> torch.Tensor:
        """The mean example as the model sees it (a binarized pixel's mean is its grey value), float32.

        Summed in float64 a chunk at a time, so a streamed set is read once and never held whole.
        """
        total = torch.zeros(self.x.shape[1:], dtype=torch.float64, device=self.x.device)
        for i in range(0, len(self), chunk):
            rows = slice(i, i + chunk) if self.rows is None else self.rows[i:i + chunk]
            total += self.x[rows].to(torch.float64).sum(0)
        return (total * self.scale / len(self)).float()


class _FileRows(torch.utils.data.Dataset):
    """Batches of rows of a .npy file, for a DataLoader: item = a tensor of example indices.

    Each worker process maps the file itself (a mapped array would be copied whole if pickled).
    """

    def __init__(self, source: Path, rows: torch.Tensor, shape: tuple[int, ...]):
        self.source, self.rows, self.shape, self.array = source, rows, shape, None

    def __getstate__(self):
        return {**self.__dict__, "array": None}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.array is None:
            self.array = np.load(self.source, mmap_mode="r", allow_pickle=False)
        rows = self.rows[idx].numpy()
        return torch.from_numpy(self.array[rows]).view(len(rows), *self.shape)


def raw_batches(data: TrainSet, order: torch.Tensor, start: int, batch_size: int, device: torch.device):
    """The stored examples of batches start, start + 1, ... of an epoch in `order`, as stored (uint8/float32).

    In-memory data is indexed directly. A streamed set goes through a DataLoader whose
    workers read the rows of the next batches from disk while this one trains.
    """
    steps = math.ceil(len(order) / batch_size)
    if data.rows is None:
        for i in range(start, steps):
            yield data.x.index_select(0, order[i * batch_size:(i + 1) * batch_size])
        return
    # A worker reads several batches at a time: each item crossing from a worker costs about a
    # millisecond whatever its size, and batch 20 means 2500 items an epoch.
    group = max(1, STREAM_ROWS // batch_size)
    order = order.cpu()
    items = [order[i * batch_size:min(i + group, steps) * batch_size] for i in range(start, steps, group)]
    loader = torch.utils.data.DataLoader(
        _FileRows(data.source, data.rows, tuple(data.x.shape[1:])), batch_size=None, sampler=items,
        num_workers=STREAM_WORKERS, prefetch_factor=2, pin_memory=device.type == "cuda",
        multiprocessing_context=_worker_start_method(),
        generator=torch.Generator())  # its own: the loader draws worker seeds, which must not touch the global RNG
    for rows in loader:
        for xb in rows.split(batch_size):
            yield xb.to(device, non_blocking=True)


def _worker_start_method() -> str | None:
    """fork where the platform has it (the workers need nothing of the parent but the file's name), else its default."""
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def labels_for(ds: Dataset, model: ModelConfig) -> torch.Tensor | None:
    """The labels a conditional model needs (checked against its classes); None for any other model."""
    if not model.n_classes:
        return None
    if ds.y is None:
        raise DataError(f"{ds.name}: a conditional VAE (n_classes = {model.n_classes}) needs labels, and this "
                        "data has none. Give labels (a 'y' array in the .npz, or one folder per class), or "
                        "train an unconditional model (--set model.n_classes=0).")
    if len(ds.y) and int(ds.y.min()) < 0:
        raise DataError(f"{ds.name}: labels run from {int(ds.y.min())} to {int(ds.y.max())}; a conditional VAE "
                        "needs classes numbered from 0 (0, 1, ..., K-1). Renumber them, e.g. with "
                        "numpy.unique(y, return_inverse=True).")
    if len(ds.y) and int(ds.y.max()) >= model.n_classes:
        raise DataError(f"{ds.name}: labels run from {int(ds.y.min())} to {int(ds.y.max())}, but the model has "
                        f"n_classes = {model.n_classes} (labels 0..{model.n_classes - 1}); set "
                        f"--set model.n_classes={int(ds.y.max()) + 1}.")
    return ds.y


def train_set(ds: Dataset, cfg: RunConfig, device: torch.device) -> TrainSet:
    data = cfg.data
    scale = 1 / 255 if ds.x.dtype == torch.uint8 else 1.0
    y = labels_for(ds, cfg.model)
    y = None if y is None else y.to(device)
    if ds.streamed:
        if data.binarize == "static":
            raise DataError(f"{ds.name}: static binarization keeps a binarized copy of the training data in memory, "
                            "and this data set is streamed from disk because it does not fit there; use "
                            "--binarize dynamic or none.")
        return TrainSet(ds.x, scale, data.binarize == "dynamic", y, rows=ds.rows, source=ds.source)
    if data.binarize == "static":
        # Drawn once with the recorded seed; stored as uint8 0/1 to keep memory small.
        g = torch.Generator().manual_seed(data.binarize_seed)
        return TrainSet(binarize(ds.float(), g).to(torch.uint8).to(device), 1.0, False, y)
    return TrainSet(ds.x.to(device), scale, data.binarize == "dynamic", y)


def eval_set(ds: Dataset, data: DataConfig, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Evaluation images as float32: binarized ONCE with the recorded seed unless binarize='none'.

    This fixes the protocol: two evaluations of one model on one split see the same pixels.
    generator: for a split taken in consecutive parts, one generator seeded with
    data.binarize_seed and passed to every part gives the parts the pixels of the whole.
    """
    if data.binarize is None:
        raise ConfigError("this DataConfig leaves binarize unset, and only a RunConfig fills in its default (from "
                          "the data and the decoder); pass the run's config (cfg.data), or set binarize to "
                          "'dynamic', 'static' or 'none'.")
    x = ds.float()
    if data.binarize != "none":
        x = binarize(x, generator or torch.Generator().manual_seed(data.binarize_seed))
    return x.to(device)


@torch.no_grad()
def elbo_means(model, x: torch.Tensor, batch_size: int = 1000, seed: int = 0,
               y: torch.Tensor | None = None) -> dict[str, float]:
    """Mean negative ELBO and its parts (nats per example) over x, with a fixed noise seed."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with seeded(seed, next(model.parameters()).device):
        for i in range(0, len(x), batch_size):
            parts = elbo(model, x[i : i + batch_size], y=None if y is None else y[i : i + batch_size])
            totals += torch.stack([parts.distortion.sum(), parts.rate.sum()]).double().cpu()
    model.train(was_training)
    recon, kl = (totals / len(x)).tolist()
    return {"nelbo": recon + kl, "recon": recon, "kl": kl}


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging), in a copy of the model.

    The first update copies the weights; each later one moves the average ``1 - decay`` of the
    way to them. torch.optim.swa_utils.AveragedModel computes the same, but its bookkeeping costs
    about 0.3 ms a call: for the 425k weights of the paper's 1-layer model, 0.44 ms a step against
    0.16 ms for the bare lerp below (one thread), a tenth of a batch-20 training step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model)  # buffers are the model's constants and stay as they are
        self.decay, self.updates = decay, 0
        self._average = [p.detach() for p in self.module.parameters()]
        self._weights = [p.detach() for p in model.parameters()]

    def update(self) -> None:  # on detached tensors: no autograd bookkeeping to switch off
        if self.updates == 0:
            torch._foreach_copy_(self._average, self._weights)
        else:
            torch._foreach_lerp_(self._average, self._weights, 1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.module.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        self.updates = int(tensors.pop("updates"))
        self.module.load_state_dict(tensors)


def _rng_tensors(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a resume must continue: the CPU's, the data order's, and the training
    device's if it is a GPU (the noise and the binarization draws come from there)."""
    out = {"rng.torch": torch.get_rng_state(), "rng.data": gen.get_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def save_state(run: Path, model, opt, gen: torch.Generator, state: dict,
               extra: dict[str, torch.Tensor] | None = None, ema: WeightAverage | None = None) -> None:
    """Everything needed to continue exactly, in ONE atomically written file.

    state.safetensors holds the weights, optimizer moments and RNG streams as tensors and
    the counters plus optimizer hyper-parameters as JSON in its metadata, so a crash can
    never leave tensors and counters from different steps. ``extra`` holds the tensors of
    an epoch checkpointed part-way (its data order and running sums); ``ema`` the moving
    average of the weights, if the run keeps one.
    """
    tensors, opt_meta = runs.optimizer_tensors(opt)
    tensors.update(_rng_tensors(gen, next(model.parameters()).device))
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update(extra or {})
    meta = {"state": json.dumps(state), "optimizer": json.dumps(opt_meta)}
    runs.save_tensors(run / "state.safetensors", tensors, meta)


def load_state(run: Path, model, opt, gen: torch.Generator,
               ema: WeightAverage | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer, RNGs (and the moving average) from state.safetensors; return
    (counters, epoch.* tensors)."""
    path = run / "state.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state, opt_meta = json.loads(meta["state"]), json.loads(meta["optimizer"])
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise RunError(f"{path} is not a readable checkpoint ({e}); the run cannot be resumed. "
                       f"Train it again with a new --out.") from e
    runs.load_matching(path, model, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        averaged = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not averaged:
            raise RunError(f"{path} holds no moving average of the weights, but the run's config asks for one "
                           "(train.ema); resume with the config the run was trained with.")
        ema.load_state_dict(averaged)
    opt.load_state_dict(runs.optimizer_state_dict(tensors, opt_meta))
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    device = next(model.parameters()).device
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state, {k: v for k, v in tensors.items() if k.startswith("epoch.")}


def _fingerprints(splits: Splits, cfg: RunConfig) -> str:
    """The training and validation data's fingerprints (vaekit.data.fingerprint), labels included only for a
    model that reads them: what a resume checks."""
    labels = cfg.model.n_classes > 0
    return f"{fingerprint(splits.train, labels=labels)} {fingerprint(splits.valid, labels=labels)}"


def _write_or_explain(run: Path, saved: dict | None, what: str, write: Callable[[], None]) -> None:
    """Run ``write``; turn an OSError (disk full, quota, I/O) into a RunError naming the last good checkpoint."""
    try:
        write()
    except OSError as e:
        cause = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        if saved is None:
            last = "No checkpoint was saved before this one, so the run must start again"
        else:
            where = f"epoch {saved['epoch']}" if saved["index"] is None else \
                f"epoch {saved['epoch'] + 1}, step {saved['index']} of it"
            last = (f"The last good checkpoint ({where}) is intact in {run / 'state.safetensors'}; "
                    f"continue from it with `vaekit train --out {run} --resume`")
        remedy = ("once there is room (free some disk space first)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                  "once you may write there (check the folder's permissions)"
                  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "once the cause is fixed")
        raise RunError(f"could not write {what} into {run}: {cause}. {last} {remedy}.") from e


@functools.cache
def _onednn_keeps_fp32() -> bool:
    """Whether oneDNN, allowed bf16 math, still computes fp32 matmuls in fp32 on this CPU (no AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 784, generator=g), torch.randn(784, 400, generator=g)
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        got = a @ b
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    exact = a.double() @ b.double()
    return bool((got.double() - exact).norm() / exact.norm() < 1e-6)  # fp32: ~3e-7, bf16: ~3e-3


@functools.cache
def _onednn_is_faster() -> bool:
    """Whether oneDNN's exact-fp32 matmul beats torch's default (MKL) on this CPU: timed once per process.

    It depends on the CPU: on an AMD Zen 4, oneDNN ~330 GFLOP/s against MKL's ~180 on 2 cores;
    on an Intel Xeon without AMX, MKL is ~10% faster. Best of 5 rounds of 10 products of a
    training step's shape (~30 ms in all); the minimum is what other load disturbs least.
    """
    if not _onednn_keeps_fp32():
        return False
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 784, generator=g), torch.randn(784, 400, generator=g)

    def best() -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    previous = torch.backends.mkldnn.matmul.fp32_precision
    default = best()
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        onednn = best()
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    return onednn < 0.95 * default


def prefer_onednn(device: torch.device, batch_size: int) -> bool:
    """Whether to run this training's fp32 matmuls on oneDNN rather than MKL (a workaround).

    torch routes fp32 matmuls to oneDNN only when bf16 math is allowed (onednn_fp32_matmuls);
    do so where the result is still fp32-exact (it would not be on a CPU with AMX) and oneDNN
    measured faster (_onednn_is_faster). Small batches (< 64) are faster on MKL. A run records
    the choice in its checkpoint, so a resume takes the same path and stays bitwise exact.
    """
    return device.type == "cpu" and batch_size >= 64 and _onednn_is_faster()


@contextmanager
def onednn_fp32_matmuls():
    """Send fp32 matmuls to oneDNN (by allowing it bf16 math), unconditionally; call only where
    _onednn_keeps_fp32() says they stay fp32 there."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def beta_at(tc: TrainConfig, step: float) -> float:
    """The KL weight at global step ``step`` (0-based, counted in batches of tc.batch_size): β, reached
    linearly over the warm-up steps."""
    return tc.beta * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.beta


def config_of_epoch(tc: TrainConfig, epoch: int) -> TrainConfig:
    """The training config that epoch ``epoch`` (1-based) trains with: k_start samples of z (in
    batches of k_start_batch_size, if set) in the first k_start_epochs epochs, k after. Cheap early
    epochs, then the bound that counts. grad_samples thins the backward pass of the epochs at k only:
    the few samples of the cheap start all get theirs."""
    if not (tc.k_start and epoch <= tc.k_start_epochs):
        return tc
    return dataclasses.replace(tc, k=tc.k_start, batch_size=tc.k_start_batch_size or tc.batch_size, grad_samples=0)


def objective(model, x: torch.Tensor, tc: TrainConfig, step: float, y: torch.Tensor | None = None):
    """The loss parts of one batch at global step ``step`` (0-based, in batches of tc.batch_size), as ``tc``
    says; y: labels, if conditional."""
    return loss_parts(model, x, y, beta_at(tc, step), tc)


def loss_parts(model, x: torch.Tensor, y: torch.Tensor | None, beta: float | torch.Tensor, tc: TrainConfig):
    """The objective's parts for a batch, with the KL weight ``beta`` given (a tensor when compiled)."""
    if tc.objective == "iwae":
        return iwae(model, x, tc.k, y, beta=beta, dreg=tc.dreg, grad_samples=tc.grad_samples)
    if tc.objective == "norm-penalty":
        return norm_penalty(model, x, tc.beta, y)
    return elbo(model, x, beta=beta, free_bits=tc.free_bits, k=tc.k, y=y)


def compiled_loss(model, x: torch.Tensor, y: torch.Tensor | None, tc: TrainConfig, autocast,
                  then: TrainConfig | None = None) -> Callable | None:
    """torch.compile(loss_parts) (with dreg: torch.compile(dreg_from_noise), its noise drawn outside),
    or None after saying why it cannot be used here.

    Compiles by running one forward and backward on the batch x (random state forked, gradients
    dropped after), so a missing compiler or an unsupported op shows now, not mid-epoch; with
    ``then`` (the config of later epochs, after a cheap start), once more with that config.
    β goes in as a tensor, so KL warm-up does not recompile every step; shapes are static
    (the epoch's last, smaller batch compiles once more).
    """
    try:
        if tc.dreg:
            # The whole DReG step is one compiled function (eager iwae's hook on z would not
            # be applied inside a graph). Its random numbers are drawn outside, in eager iwae's
            # order (the noise of z, then the draw's offsets), so a seed trains alike either way.
            step = torch.compile(dreg_from_noise, dynamic=False)
            with torch.no_grad():
                noise = noise_drawer(encode(model, x[:1], None if y is None else y[:1]))

            def fn(model, x, y, beta, tc):
                k, n = tc.k, x.shape[0]
                m = tc.grad_samples if 0 < tc.grad_samples < k else k
                eps = noise((k, n))
                u = torch.rand(n, 1, dtype=eps.dtype, device=eps.device) if m < k else None
                return step(model, x, y, eps, u, beta, m)
        else:
            fn = torch.compile(loss_parts, dynamic=False)
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device]), autocast:
            for c in (tc,) if then is None else (tc, then):
                fn(model, x, y, torch.tensor(1.0, device=x.device), c).loss.mean().backward()
    except Exception as e:  # compilers fail in many ways: no C compiler, an op inductor lacks, ...
        warnings.warn(f"--compile: torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "training without it.", stacklevel=2)
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return fn


def selection_score(record: dict) -> float:
    """What an epoch's metrics record is ranked by to keep the best weights (lower is better):
    the validation −L_k for IWAE runs, the validation −ELBO otherwise. A non-finite score (NaN in
    memory, null once written) ranks last."""
    score = record.get("valid_iwae_loss", record["valid_nelbo"])
    return score if score is not None and math.isfinite(score) else math.inf


@torch.no_grad()
def valid_loss(model, x: torch.Tensor, tc: TrainConfig, seed: int = 0, y: torch.Tensor | None = None) -> float | None:
    """−L_k on x with the training k, for IWAE runs with k > 1 (None otherwise): what their best epoch is chosen by.

    An IWAE-trained q is broad on purpose, so its one-sample ELBO is a poor guide to its
    log-likelihood; the bound it was trained on is a good one. At k = 1 that bound is the ELBO,
    which the validation −ELBO gives already, with its KL in closed form instead of sampled.
    """
    if tc.objective != "iwae" or tc.k == 1:
        return None
    was_training = model.training
    model.eval()
    total, chunk = 0.0, max(1, 20_000 // tc.k)  # images per pass: 20k decoded samples
    with seeded(seed, next(model.parameters()).device):
        for i in range(0, len(x), chunk):
            total += iwae(model, x[i : i + chunk], tc.k, None if y is None else y[i : i + chunk]).loss.double().sum().item()
    model.train(was_training)
    return total / len(x)


def diverged(what: str, epoch: int | None = None) -> str:
    """The message for a run that has stopped learning: what went wrong and what to try."""
    when = "" if epoch is None else f" in epoch {epoch}"
    return (f"training diverged{when}: {what}. Train a new run (another --out) with a lower --lr or a gradient clip (--set "
            "train.grad_clip=1.0). If the data's values are large (far outside [0, 1]), scale them first, "
            "e.g. 8-bit pixels to [0, 1]: a Gaussian decoder's log-likelihood and the encoder's variances "
            "overflow on values in the hundreds.")


def lr_schedule(tc: TrainConfig, total_steps: int) -> Callable[[int], float] | None:
    """Learning rate at a global step, or None for a constant rate (nothing to do per step)."""
    if tc.lr_schedule == "cosine":  # Loshchilov & Hutter 2017, without restarts, down to lr_min
        return lambda t: tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    return None


def fit(
    model,
    cfg: RunConfig,
    splits: Splits,
    run: Path | str | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` as ``cfg.train`` says; checkpoint into ``run``; return the metrics.

    The metrics are one dict an epoch: train_* and valid_* means per example, in nats
    (valid_nelbo is the validation −ELBO), and the epoch's seconds. ``run``, a directory, gets
    config.json (``cfg``; a resume rewrites it only once the checkpoint and the data pass their
    checks), the weights (model.safetensors: the best validation epoch; last.safetensors),
    metrics.jsonl and the checkpoint state.safetensors; `vaekit.load(run)` rebuilds the model
    from it. ``model`` stays in training mode.

    A checkpoint is written at the end of every epoch and, if ``cfg.train.checkpoint_every``
    is set, every that many steps. ``resume=True`` continues from the last one bitwise
    exactly: same weights and same metrics (but for "seconds") as a run never stopped.
    With ``cfg.train.ema`` the validation metrics, the choice of the best epoch and the saved
    weights (model.safetensors, last.safetensors) are those of the moving average of the
    weights; ``model`` itself ends with the raw weights of the last step.
    """
    tc = cfg.train
    device = next(model.parameters()).device
    if cfg.data.source == "mnist" and not splits.train.name.startswith("mnist"):
        warnings.warn(f"cfg.data.source is 'mnist' (the default), but the training data is {splits.train.name!r}: "
                      f"the run records MNIST as its data and takes MNIST's binarization default "
                      f"({cfg.data.binarize!r}). Describe your data: DataConfig(source=...).", stacklevel=2)
    if cfg.model.likelihood == "bernoulli":  # (a streamed split is read whole to check it: the CLI does that)
        for ds in (splits.train, splits.valid):
            if not ds.streamed:
                check_unit_range(ds)
    if device.type == "cpu":
        keep_freed_memory()  # each step's temporaries reuse the last step's pages (vaekit.cpu)
    data = train_set(splits.train, cfg, device)
    x_valid = eval_set(splits.valid, cfg.data, device)
    y_valid = labels_for(splits.valid, cfg.model)
    y_valid = None if y_valid is None else y_valid.to(device)
    n = len(data)
    # The lr schedule and the KL warm-up count progress in steps of tc.batch_size examples; an epoch
    # with another batch size (k_start_batch_size) advances them by the same amount over its own steps.
    steps_per_epoch = math.ceil(n / tc.batch_size)

    # fused: one vectorised kernel over all parameters (bench/train_speed.py: ~3x faster step than foreach on CPU)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, eps=tc.adam_eps, fused=True)
    gen = torch.Generator().manual_seed(tc.seed)  # data order and binarization draws
    ema = WeightAverage(model, tc.ema) if tc.ema else None
    judged = model if ema is None else ema.module  # the weights validated and saved
    state = {"epoch": 0, "step": 0, "best_epoch": None, "best_score": None, "skipped_steps": 0,
             "skipped_in_a_row": 0}
    part: dict | None = None  # an epoch checkpointed part-way: where to pick it up
    metrics: list[dict] = []
    if run is not None:
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        runs.remove_temp_files(run)  # left by a process killed while writing
        if not resume:  # so vaekit.load rebuilds this model from the directory (a resume writes it below)
            runs.save_config(run, cfg)
    if resume:
        if run is None or not (run / "state.safetensors").is_file():
            raise RunError(f"nothing to resume in {run}: it stopped before writing its first checkpoint "
                           "(state.safetensors); train it again from the start.")
        state, epoch_tensors = load_state(run, model, opt, gen, ema)
        if "data" in state and state["data"] != _fingerprints(splits, cfg):  # (runs before 2026-12-07 record none)
            raise DataError(f"the training data of {run} ({cfg.data.source}) has changed since the run began: its "
                            f"examples or labels differ. Put the run's data back, or train a new run on this data.")
        if cfg != runs.load_config(run):  # e.g. `--resume --epochs N`: written once the checks above have passed
            runs.save_config(run, cfg)
        state.setdefault("skipped_in_a_row", 0)
        if "best_valid_nelbo" in state:  # the name checkpoints before 2026-11-25 gave the selection score
            state["best_score"] = state.pop("best_valid_nelbo")
        part = state.pop("part", None)
        if part is not None:
            batch = config_of_epoch(tc, state["epoch"] + 1).batch_size
            if part["batch_size"] != batch or len(epoch_tensors["epoch.order"]) != n:
                raise RunError(
                    f"{run} was checkpointed part-way through epoch {state['epoch'] + 1} with batch size "
                    f"{part['batch_size']} on {len(epoch_tensors['epoch.order'])} training examples, but its "
                    f"config and data now give batch size {batch} on {n}; restore them to resume.")
            part.update(order=epoch_tensors["epoch.order"].to(device), sums=epoch_tensors["epoch.sums"].to(device))
        # Metrics of an epoch logged but not checkpointed before a crash are dropped; it is redone.
        logged = runs.read_jsonl(run / "metrics.jsonl")
        metrics = [m for m in logged if m["epoch"] <= state["epoch"]]
        if len(metrics) < len(logged):
            _write_or_explain(run, {"epoch": state["epoch"], "index": None if part is None else part["index"]},
                              "the metrics of the checkpointed epochs",
                              lambda: runs.write_jsonl(run / "metrics.jsonl", metrics))
    else:
        state["data"] = _fingerprints(splits, cfg)
        torch.manual_seed(tc.seed)  # the reparameterization noise
        if tc.output_bias == "data":
            fit_output_bias_(model, data.mean())
        if run is not None:  # a run restarted from scratch: its old metrics are void
            (run / "metrics.jsonl").unlink(missing_ok=True)
    # The last checkpoint on disk, for the message if writing the next one fails.
    saved = None if not resume else {"epoch": state["epoch"], "index": part and part["index"]}

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()
    )
    every = tc.checkpoint_every if run is not None else None
    schedule = lr_schedule(tc, steps_per_epoch * tc.epochs)
    step_loss = None  # the compiled loss, when asked for and it works
    beta_t = torch.zeros((), device=device)  # β for the compiled loss, refilled every step
    # The matmul path is chosen once per run (timing can differ between processes) and kept.
    if "onednn_fp32" not in state:
        state["onednn_fp32"] = prefer_onednn(device, tc.batch_size)
    state["onednn_fp32"] = state["onednn_fp32"] and _onednn_keeps_fp32()
    routing = onednn_fp32_matmuls() if state["onednn_fp32"] else nullcontext()
    with routing, flush_denormals():
        model.train()
        if tc.compile:
            first = config_of_epoch(tc, state["epoch"] + 1)
            probe = data.first(first.batch_size).to(device).float().mul_(data.scale)  # rounded, not sampled: no RNG
            step_loss = compiled_loss(model, probe.round() if data.dynamic else probe,
                                      None if data.y is None else data.y[: first.batch_size], first, autocast,
                                      then=None if first is tc else tc)
        for epoch in range(state["epoch"] + 1, tc.epochs + 1):
            tc_epoch = config_of_epoch(tc, epoch)  # a new k or batch size compiles once more
            batch = tc_epoch.batch_size
            steps = math.ceil(n / batch)
            t0 = time.perf_counter()
            if part is None:
                order = torch.randperm(n, generator=gen).to(device)
                sums = torch.zeros(4, device=device)  # recon, kl, loss, examples
                start, skipped, seconds = 0, 0, 0.0
            else:  # continue the epoch where its checkpoint left it; the RNGs are already restored
                order, sums, start, skipped, seconds = (part[k] for k in ("order", "sums", "index", "skipped", "seconds"))
                part = None
            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{tc.epochs}", disable=not progress,
                       leave=False, unit="step")
            batches = raw_batches(data, order, start, batch, device)
            for i, xb in zip(range(start, steps), batches):
                idx = order[i * batch : (i + 1) * batch]
                # Progress in steps of tc.batch_size (exactly state["step"] + i when batch is tc.batch_size).
                at = (epoch - 1) * steps_per_epoch + (i if steps == steps_per_epoch else i * steps_per_epoch / steps)
                if data.dynamic and xb.dtype == torch.uint8 and xb.device.type == "cpu":
                    xb = binarize_u8(xb, gen)  # (B, *shape) float32 0/1, straight from the bytes
                else:
                    xb = xb.float().mul_(data.scale)  # (B, *shape) in [0, 1]
                    if data.dynamic:
                        xb = torch.bernoulli(xb, generator=gen if xb.device.type == "cpu" else None)
                yb = None if data.y is None else data.y.index_select(0, idx)
                if schedule is not None:
                    for group in opt.param_groups:
                        group["lr"] = schedule(at)
                with autocast:
                    if step_loss is None:
                        parts = objective(model, xb, tc_epoch, at, yb)
                    else:
                        parts = step_loss(model, xb, yb, beta_t.fill_(beta_at(tc, at)), tc_epoch)
                loss = parts.loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip else None
                )
                # A non-finite loss skips the update, and with grad_clip (whose norm is at hand) so does a
                # non-finite gradient (vdvae's training_step does the same). Without it, a gradient gone
                # non-finite on a finite loss leaves non-finite weights, whose losses are skipped in turn
                # until training stops with the message below.
                finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss + grad_norm)
                if finite:
                    state["skipped_in_a_row"] = 0
                    opt.step()
                    if ema is not None:
                        ema.update()
                    sums += torch.stack(
                        [parts.distortion.detach().sum(), parts.rate.detach().sum(), parts.loss.detach().sum(),
                         loss.new_tensor(len(xb))])
                else:
                    skipped += 1
                    state["skipped_in_a_row"] += 1
                    if state["skipped_in_a_row"] >= MAX_CONSECUTIVE_SKIPS:
                        bar.close()
                        raise RunError(diverged(f"{state['skipped_in_a_row']} steps in a row had a non-finite loss "
                                                "or gradient", epoch))
                if every is not None and (state["step"] + i + 1) % every == 0 and i + 1 < steps:
                    # Mid-epoch checkpoint: the epoch's order, step index and running sums join the
                    # usual state, so a resume replays the rest of this epoch exactly.
                    part_state = {**state, "part": {"index": i + 1, "skipped": skipped, "batch_size": batch,
                                                    "seconds": seconds + time.perf_counter() - t0}}
                    _write_or_explain(run, saved, f"the checkpoint at epoch {epoch}, step {i + 1}", lambda: save_state(
                        run, model, opt, gen, part_state, {"epoch.order": order, "epoch.sums": sums}, ema))
                    saved = {"epoch": epoch - 1, "index": i + 1}
                if progress and ((i + 1) % BAR_EVERY == 0 or i + 1 == steps):
                    loss_sum, m = sums[2:].tolist()
                    bar.set_postfix(loss=f"{loss_sum / max(m, 1):.2f}", refresh=False)
                    bar.update((i + 1) - bar.n)
            bar.close()
            r, k, loss_sum, m = sums.tolist()
            if not m:  # a short epoch can skip every step without reaching MAX_CONSECUTIVE_SKIPS
                raise RunError(diverged(f"none of its {steps} steps had a finite loss or gradient", epoch))
            valid = elbo_means(judged, x_valid, tc.eval_batch_size, seed=tc.seed, y=y_valid)
            v_loss = valid_loss(judged, x_valid, tc, seed=tc.seed, y=y_valid)
            if v_loss is not None:
                valid["iwae_loss"] = v_loss
            state["step"] += steps
            state["skipped_steps"] += skipped
            state["epoch"] = epoch
            # The norm penalty's terms are a squared error and a code's norm, not nats: named as such.
            terms = (("train_nelbo", "train_recon", "train_kl") if tc.objective != "norm-penalty"
                     else (None, "train_sse", "train_code_norm"))
            record = {
                "epoch": epoch,
                "step": state["step"],
                **({terms[0]: (r + k) / max(m, 1)} if terms[0] else {}),
                terms[1]: r / max(m, 1),
                terms[2]: k / max(m, 1),
                "train_loss": loss_sum / max(m, 1),
                **{f"valid_{key}": value for key, value in valid.items()},
                "skipped_steps": skipped,
                "seconds": seconds + time.perf_counter() - t0,
            }
            score = selection_score(record)
            improved = state["best_score"] is None or score < state["best_score"]
            if improved:
                state["best_score"], state["best_epoch"] = score, epoch
            metrics.append(record)
            if run is not None:
                # state.safetensors is written last: it is the commit point. A crash before it
                # redoes this epoch on resume, which rewrites the other files with the same bytes.
                def write_epoch():
                    if improved:
                        runs.save_weights(run / "model.safetensors", judged)
                    runs.save_weights(run / "last.safetensors", judged)
                    runs.write_jsonl(run / "metrics.jsonl", metrics)
                    save_state(run, model, opt, gen, state, ema=ema)

                _write_or_explain(run, saved, f"the checkpoint of epoch {epoch}", write_epoch)
                saved = {"epoch": epoch, "index": None}
            if on_epoch is not None:
                on_epoch(record)
    return metrics
