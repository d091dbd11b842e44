"""How fast is one VAE training epoch on this CPU, against its limit and a plain loop?

    python bench/train_speed.py [--epochs 2] [--models mlp,iwae] [--skip-compile] [--quick]
        [--threads N] [--clock wall|cpu] [--repeat R] [--wait-quiet S] [--iwae-batch 20]
        [--rows ...] [--profile] [--candidates]

Two architectures, 50k binarized MNIST training images, the fixed 10k validation split:
  mlp    784-400-20, ReLU, batch 128   (pytorch/examples vae/main.py)
  iwae   784-200-200-50, tanh, batch 20 (Burda et al. 2015: yburda/iwae experiments.py trains
         with minibatch_size=20; vaekit's "iwae-1l" preset says 100: --iwae-batch 100)

Rows, each trained from scratch for --epochs epochs in its OWN subprocess (fresh thread
pool and allocator, its own peak RSS, no compile cache shared between rows):
  limit fp32          the epoch's matrix products alone: torch.addmm (forward) and torch.mm
                      (grad weight; grad input for all layers but the first, which autograd
                      skips too) with the step's shapes and counts, into preallocated outputs;
                      no nonlinearity, loss or optimizer. torch's default fp32 path (MKL sgemm).
                      The "/limit" column divides by this row.
  limit fp32 onednn   the same with fp32 matmuls sent to oneDNN (see onednn_fp32_matmuls).
  limit bf16          the same in bfloat16 (oneDNN).
  plain               pytorch/examples vae/main.py's loop: DataLoader over a float32
                      TensorDataset (shuffle, batch B, no workers, as on CPU there), sigmoid
                      decoder, F.binary_cross_entropy(reduction='sum') + the closed-form KL,
                      Adam(lr=1e-3) with its CPU defaults, loss.item() every step. The one
                      change: each batch is binarized with torch.bernoulli (dynamic
                      binarization), so that it trains on the same input as vaekit.
  vaekit fp32/bf16    vaekit.train.fit (progress off, run=None). fit validates every epoch;
                      that validation (elbo_means on 10k images) is timed separately after
                      training and subtracted, so the column is training only.
  vaekit compile      the same fit with train.compile = True (`vaekit train --compile`): the loss,
                      forward and backward, compiled by inductor; first epoch holds the compile.
  proto ...           fit's loop with the changes this bench recommends (fused Adam,
                      index_select gather, integer-threshold binarization, closed-form KL),
                      "onednn": + fp32 matmuls on oneDNN, "compile": + the loss (forward and
                      backward) compiled whole. Same objective, same validation protocol.
  vaekit streamed     vaekit fp32 with the training images in a .npy file read through vaekit's
                      out-of-core path (`--stream yes`: memory-mapped, batches gathered by
                      DataLoader workers). The file sits in the page cache, so this is the
                      loader's overhead, not the disk's speed; the workers' memory is not in RSS.
  pythae              Pythae's TrainingPipeline, if importable (this bench never installs it).

Columns: seconds per epoch, training only (mean of epochs 2.. when there are several; the
first epoch, with warm-up and compilation, separately), process CPU seconds, images/s, time
over the fp32 limit, speed-up over the plain loop, the validation ELBO after the same
epochs (one-sample ELBO on the validation images binarized once with seed 0, fixed noise
seed: vaekit.train.elbo_means, for every row), the row's peak RSS, and how many cores OTHER
processes kept busy meanwhile.

On a shared 2-core machine other processes are the main source of noise: with two threads,
one busy core slows every parallel op by a scheduler time slice (10x-40x here). So:
--threads 1 --clock cpu gives numbers that hardly move with other load; --wait-quiet S waits
for free cores before each row; --repeat R runs the rows round-robin R times and keeps each
row's fastest run (the host's speed also drifts by tens of percent over minutes).

--profile     adds a grouped torch.profiler breakdown of 100 steps of fit's step and the proto step.
--candidates  adds micro-benchmarks of the candidate changes one by one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch._dynamo  # noqa: F401  imported by torch.optim on first use (~1 s): here, outside every timing
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from vaekit import train as vtrain
from vaekit.config import RunConfig
from vaekit.data import binarize, binarize_u8, load_data, load_path
from vaekit.models import build
from vaekit.objectives import ElboParts, elbo, normal_kl
from vaekit.train import elbo_means, eval_set

N_VALID_TIMINGS = 3

MODELS = {
    "mlp": {"hidden": (400,), "latent": 20, "activation": "relu", "batch": 128},
    "iwae": {"hidden": (200, 200), "latent": 50, "activation": "tanh", "batch": 20},
}


# ---------------------------------------------------------------- machine load


def _busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine so far (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OtherLoad:
    """Cores kept busy by other processes during the block (0 on a quiet machine)."""

    def __enter__(self):
        self.busy, self.own, self.t = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        self.cores = max(0.0, (_busy_seconds() - self.busy) - (_own_seconds() - self.own)) / max(wall, 1e-9)


# ---------------------------------------------------------------- data and models


def model_config(name: str, args):
    spec = MODELS[name]
    batch = args.iwae_batch if name == "iwae" else spec["batch"]
    return RunConfig().replace(
        model={"hidden": list(spec["hidden"]), "latent_dim": spec["latent"], "activation": spec["activation"]},
        data={"binarize": "dynamic", "subset": args.subset},
        train={"epochs": args.epochs, "batch_size": batch, "seed": 0},
    )


def load_splits(cfg):
    return load_data("mnist", subset=cfg.data.subset)


def valid_set(cfg, splits) -> torch.Tensor:
    return eval_set(splits.valid, cfg.data)


class Clock:
    """Wall and process-CPU seconds. With one thread, CPU seconds hardly change when other
    processes compete for the cores (wall seconds do); with two, spinning threads inflate them."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def timed_validation(model, cfg, x_valid) -> tuple[float, float, float]:
    """(wall s, CPU s, valid ELBO) of one elbo_means pass over x_valid: fit's per-epoch validation."""
    best = (math.inf, math.inf)
    for _ in range(N_VALID_TIMINGS):
        clock = Clock()
        out = elbo_means(model, x_valid, cfg.train.eval_batch_size, seed=cfg.train.seed)
        best = min(best, clock.lap())
    return best[0], best[1], -out["nelbo"]


# ---------------------------------------------------------------- oneDNN for fp32 matmuls


def onednn_fp32_matmuls() -> str:
    """Send fp32 matmuls to oneDNN instead of MKL, if oneDNN keeps them fp32 on this CPU.

    MKL's sgemm takes a slower (AVX2) path on AMD CPUs; oneDNN's AVX-512 brgemm is about
    twice as fast there. PyTorch routes fp32 matmuls to oneDNN only when bf16 math is allowed
    (torch.backends.mkldnn.matmul.fp32_precision = "bf16"). Where oneDNN has no implicit-bf16
    kernel (no AMX, as here) it computes in fp32; with AMX it would round to bf16. So: allow
    it, measure the error against float64 on training-like shapes, and undo it if not fp32.
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 784, generator=g), torch.randn(784, 400, generator=g)
    exact = a.double() @ b.double()
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    err = ((a @ b).double() - exact).norm() / exact.norm()
    if err > 1e-6:  # fp32 gives ~3e-7 here, bf16 ~3e-3
        torch.backends.mkldnn.matmul.fp32_precision = previous
        return f"oneDNN would round fp32 matmuls to bf16 here (rel. error {err:.1e}): kept MKL"
    return f"fp32 matmuls via oneDNN (rel. error {err:.1e}, fp32-exact)"


# ---------------------------------------------------------------- the limit


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """(in, out) of every Linear of the MLP VAE, encoder then decoder."""
    d_x = math.prod(cfg.model.input_shape)
    h, d = list(cfg.model.hidden), cfg.model.latent_dim
    enc = [d_x, *h, 2 * d]
    dec = [d, *reversed(h), d_x]
    return list(zip(enc[:-1], enc[1:])) + list(zip(dec[:-1], dec[1:]))


def batch_sizes(n: int, b: int) -> list[int]:
    return [b] * (n // b) + ([n % b] if n % b else [])


def matmul_flops(cfg, n: int) -> float:
    """Forward + grad weight for every layer, + grad input for all but the first."""
    return sum(2 * bs * i * o * (2 if k == 0 else 3)
               for bs in batch_sizes(n, cfg.train.batch_size) for k, (i, o) in enumerate(layer_shapes(cfg)))


def time_limit(cfg, n: int, dtype: torch.dtype, reps: int = 2) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of bare addmm/mm with the training step's shapes (best of reps)."""
    layers = layer_shapes(cfg)
    sizes = batch_sizes(n, cfg.train.batch_size)
    w = [torch.randn(o, i).mul_(i ** -0.5).to(dtype) for i, o in layers]
    b = [torch.zeros(o, dtype=dtype) for _, o in layers]
    grad_w = [torch.empty(o, i, dtype=dtype) for i, o in layers]
    per = {}  # batch size -> inputs, output grads, outputs, input grads (all preallocated)
    for bs in set(sizes):
        per[bs] = ([torch.rand(bs, i).to(dtype) for i, _ in layers], [torch.randn(bs, o).to(dtype) for _, o in layers],
                   [torch.empty(bs, o, dtype=dtype) for _, o in layers], [torch.empty(bs, i, dtype=dtype) for i, _ in layers])
    best = (math.inf, math.inf)
    for _ in range(reps):
        clock = Clock()
        for bs in sizes:
            x, g, y, gx = per[bs]
            for k in range(len(layers)):  # forward: y = b + x Wᵀ
                torch.addmm(b[k], x[k], w[k].t(), out=y[k])
            for k in reversed(range(len(layers))):  # backward: dW = gᵀ x, dx = g W
                torch.mm(g[k].t(), x[k], out=grad_w[k])
                if k > 0:
                    torch.mm(g[k], w[k], out=gx[k])
        best = min(best, clock.lap())
    return best


# ---------------------------------------------------------------- plain loop (pytorch/examples)


class ExampleVAE(nn.Module):
    """vae/main.py's VAE, with its widths and activation as arguments (fc1, fc21/fc22, fc3, fc4)."""

    def __init__(self, d_x: int, hidden: list[int], latent: int, activation: str):
        super().__init__()
        self.d_x = d_x
        self.act = {"relu": F.relu, "tanh": torch.tanh}[activation]
        enc = [d_x, *hidden]
        self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(enc[:-1], enc[1:]))
        self.fc21 = nn.Linear(hidden[-1], latent)
        self.fc22 = nn.Linear(hidden[-1], latent)
        dec = [latent, *reversed(hidden)]
        self.dec = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec[:-1], dec[1:]))
        self.out = nn.Linear(hidden[0], d_x)

    def encode(self, x):
        h = x
        for layer in self.enc:
            h = self.act(layer(h))
        return self.fc21(h), self.fc22(h)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h = z
        for layer in self.dec:
            h = self.act(layer(h))
        return torch.sigmoid(self.out(h))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.d_x))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def example_loss(recon_x, x, mu, logvar, d_x):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, d_x), reduction="sum")
    # Appendix B of Kingma & Welling: 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def as_vaekit(example: ExampleVAE, cfg):
    """The same weights in a vaekit MLPVAE, so that one evaluator scores every row."""
    model = build(cfg.model, seed=0)
    enc = [m for m in model.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in model.decoder if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for dst, src in zip(enc, list(example.enc)):
            dst.weight.copy_(src.weight), dst.bias.copy_(src.bias)
        enc[-1].weight.copy_(torch.cat([example.fc21.weight, example.fc22.weight]))
        enc[-1].bias.copy_(torch.cat([example.fc21.bias, example.fc22.bias]))
        for dst, src in zip(dec, [*example.dec, example.out]):
            dst.weight.copy_(src.weight), dst.bias.copy_(src.bias)
    return model


def row_plain(cfg, splits, x_valid, args) -> dict:
    torch.manual_seed(1)  # vae/main.py's default seed
    d_x = math.prod(cfg.model.input_shape)
    model = ExampleVAE(d_x, list(cfg.model.hidden), cfg.model.latent_dim, cfg.model.activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.utils.data.TensorDataset(splits.train.float())  # float32 in [0, 1], like ToTensor()
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
    log = []
    laps = []
    for epoch in range(1, cfg.train.epochs + 1):
        clock = Clock()
        model.train()
        train_loss = 0
        for batch_idx, (x,) in enumerate(loader):
            x = torch.bernoulli(x)  # dynamic binarization: the one change, see the module docstring
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss = example_loss(recon, x, mu, logvar, d_x)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            if batch_idx % 10 == 0:  # log_interval; formatted as vae/main.py does, not printed
                log.append(f"Train Epoch: {epoch} [{batch_idx * len(x)}] Loss: {loss.item() / len(x):.6f}")
        laps.append(clock.lap())
    *_, elbo = timed_validation(as_vaekit(model, cfg), cfg, x_valid)
    return {"seconds": [w for w, _ in laps], "cpu": [c for _, c in laps], "valid_elbo": elbo}


# ---------------------------------------------------------------- vaekit.train.fit


def row_fit(cfg, splits, x_valid, args, precision: str, compile_mode: str | None = None) -> dict:
    """vaekit.train.fit as a user runs it; compile_mode set: with --compile (train.compile=True)."""
    cfg = cfg.replace(train={"precision": precision, "compile": compile_mode is not None})
    model = build(cfg.model, seed=0)
    clock, laps = Clock(), []
    with warnings.catch_warnings(record=True) as caught:  # fit warns when compilation fails and it falls back
        warnings.simplefilter("always")
        metrics = vtrain.fit(model, cfg, splits, run=None, progress=False, on_epoch=lambda _: laps.append(clock.lap()))
    note = "; ".join(str(w.message)[:160] for w in caught if str(w.message).startswith("--compile"))
    wall_valid, cpu_valid, _ = timed_validation(model, cfg, x_valid)
    # Each lap is one epoch of fit (the first also holds fit's set-up and compilation) including its validation.
    return {"seconds": [w - wall_valid for w, _ in laps], "cpu": [c - cpu_valid for _, c in laps],
            "valid_elbo": -metrics[-1]["valid_nelbo"], "valid_seconds": wall_valid, "note": note}


def streamed(splits, tmp: Path):
    """The same splits with the training images in a .npy file streamed from disk (vaekit's out-of-core path)."""
    path = tmp / "train.npy"
    np.save(path, splits.train.x.numpy())
    return replace(splits, train=load_path(path, stream="yes"))


# ---------------------------------------------------------------- the proposed loop


def elbo_closed(model, x: torch.Tensor, beta: float = 1.0) -> ElboParts:
    """objectives.elbo with the KL of the diagonal Gaussians q(z|x) and p(z) written out
    (Appendix B of Kingma & Welling when p = N(0, I)); same numbers, traceable whole."""
    q = model.encode(x)
    z = q.rsample()
    distortion = -model.decode(z).log_prob(x)
    rate = normal_kl(q.base_dist, model.prior().base_dist).sum(-1)  # (B,)
    return ElboParts(distortion, rate, distortion + beta * rate)


def proto_fit(model, cfg, splits, x_valid, compile_mode: str | None = None):
    """fit's loop with the recommended changes; returns ((wall, CPU) training seconds per epoch, valid ELBOs, note)."""
    tc = cfg.train
    x_all = splits.train.x  # (N, *shape) uint8
    n = len(x_all)
    steps = math.ceil(n / tc.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=True)
    gen = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()

    def loss_fn(xb):
        with autocast:
            parts = elbo_closed(model, xb, beta=tc.beta)
        return parts.loss.mean(), torch.stack([parts.distortion.detach().sum(), parts.rate.detach().sum()])

    note = ""
    step_loss = loss_fn
    if compile_mode is not None:
        step_loss = torch.compile(loss_fn, fullgraph=True, mode=None if compile_mode == "default" else compile_mode)
    laps, elbos = [], []
    model.train()
    for _ in range(tc.epochs):
        clock = Clock()
        order = torch.randperm(n, generator=gen)
        sums = torch.zeros(3)
        for i in range(steps):
            idx = order[i * tc.batch_size : (i + 1) * tc.batch_size]
            xb = binarize_u8(x_all.index_select(0, idx), gen)  # (B, *shape) float32 0/1
            try:
                loss, parts = step_loss(xb)
            except Exception as e:  # compilation failed: say why, continue eagerly
                if step_loss is loss_fn:
                    raise
                note = f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager fallback"
                step_loss = loss_fn
                loss, parts = step_loss(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss):
                continue
            opt.step()
            sums[:2] += parts
            sums[2] += len(xb)
        laps.append(clock.lap())
        elbos.append(-elbo_means(model, x_valid, tc.eval_batch_size, seed=tc.seed)["nelbo"])
    return laps, elbos, note


def row_proto(cfg, splits, x_valid, args, precision: str, compile_mode: str | None = None) -> dict:
    cfg = cfg.replace(train={"precision": precision})
    model = build(cfg.model, seed=0)
    laps, elbos, note = proto_fit(model, cfg, splits, x_valid, compile_mode)
    return {"seconds": [w for w, _ in laps], "cpu": [c for _, c in laps], "valid_elbo": elbos[-1], "note": note}


# ---------------------------------------------------------------- Pythae (only if already installed)


def row_pythae(cfg, splits, x_valid, args) -> dict:
    """Pythae's VAE with the same MLP, trained by its TrainingPipeline on a statically binarized set.

    Pythae has no dynamic binarization, and its per-epoch time includes its own evaluation and
    bookkeeping; both are said in the note.
    """
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    d_x = math.prod(cfg.model.input_shape)
    example = ExampleVAE(d_x, list(cfg.model.hidden), cfg.model.latent_dim, cfg.model.activation)

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = example

        def forward(self, x):
            mu, logvar = self.net.encode(x.reshape(-1, d_x))
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = example

        def forward(self, z):
            return ModelOutput(reconstruction=self.net.decode(z).reshape(-1, *cfg.model.input_shape))

    model = VAE(VAEConfig(input_dim=tuple(cfg.model.input_shape), latent_dim=cfg.model.latent_dim,
                          reconstruction_loss="bce"), encoder=Encoder(), decoder=Decoder())
    x_train = binarize(splits.train.float(), torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as out:
        tcfg = BaseTrainerConfig(output_dir=out, num_epochs=cfg.train.epochs, learning_rate=cfg.train.lr,
                                 per_device_train_batch_size=cfg.train.batch_size,
                                 per_device_eval_batch_size=cfg.train.eval_batch_size, no_cuda=True)
        clock = Clock()
        TrainingPipeline(training_config=tcfg, model=model)(train_data=x_train, eval_data=x_valid)
        wall, cpu = clock.lap()
    *_, elbo = timed_validation(as_vaekit(example, cfg), cfg, x_valid)
    e = cfg.train.epochs
    return {"seconds": [wall / e] * e, "cpu": [cpu / e] * e, "valid_elbo": elbo,
            "note": "static binarization; time includes Pythae's per-epoch eval and saving"}


# ---------------------------------------------------------------- profile and candidates


def profile_steps(cfg, splits, args) -> None:
    """Grouped self-CPU time per step: fit's step (as in train.py) and the proto step."""
    from torch.profiler import ProfilerActivity, profile

    x4 = splits.train.x
    x_all = x4.flatten(1)
    b = cfg.train.batch_size
    order = torch.randperm(len(x4))
    batches = [order[j * b:(j + 1) * b] for j in range(len(x4) // b)]  # step i uses batches[i % len]
    groups = {
        "matmul": ("aten::mm", "aten::addmm"),
        "optimizer": ("aten::_fused_adam", "aten::_foreach", "aten::sqrt", "aten::addcdiv", "aten::addcmul",
                      "aten::lerp", "Optimizer."),
        "rng": ("aten::bernoulli", "aten::normal_", "aten::uniform_", "aten::random_"),
        "gather": ("aten::index", "aten::index_select"),
        "casts/copies": ("aten::copy_", "aten::_to_copy"),
        "likelihood": ("aten::log_sigmoid", "aten::binary_cross_entropy", "aten::sigmoid", "aten::softplus"),
    }
    variants = [("fp32", "fit step"), ("fp32", "proto step"), ("fp32", "proto step, oneDNN"),
                ("bf16", "fit step"), ("bf16", "proto step")]
    for precision, name in variants:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        if "oneDNN" in name:
            onednn_fp32_matmuls()
        model = build(cfg.model, seed=0)
        gen = torch.Generator().manual_seed(0)
        if name == "fit step":  # what vaekit.train.fit does in a step, but the progress bar and checkpoints
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            sums = torch.zeros(4)

            def step(i):
                xb = binarize_u8(x4.index_select(0, batches[i % len(batches)]), gen)
                with autocast:
                    parts = vtrain.objective(model, xb, cfg.train, i)
                loss = parts.loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if torch.isfinite(loss):
                    opt.step()
                    sums.add_(torch.stack([parts.distortion.detach().sum(), parts.rate.detach().sum(),
                                           parts.loss.detach().sum(), loss.new_tensor(len(xb))]))
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

            def step(i):
                xb = binarize_u8(x_all.index_select(0, batches[i % len(batches)]), gen).view(-1, *x4.shape[1:])
                with autocast:
                    parts = elbo_closed(model, xb)
                loss = parts.loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if torch.isfinite(loss):
                    opt.step()
        for i in range(20):
            step(i)
        now = time.process_time if args.clock == "cpu" else time.perf_counter
        t = now()
        for i in range(100):
            step(i)
        wall = (now() - t) / 100
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(100):
                step(i)
        events = prof.key_averages()
        total = {k: 0.0 for k in [*groups, "other ops"]}
        calls = 0
        for e in events:
            calls += e.count if e.key.startswith("aten::") else 0
            key = next((g for g, pre in groups.items() if e.key.startswith(pre)), "other ops")
            total[key] += e.self_cpu_time_total / 100
        parts = "  ".join(f"{k} {v / 1e3:.2f}" for k, v in total.items())
        print(f"  {precision} {name:18s} {args.clock} {wall * 1e3:.2f} ms/step (unprofiled); profiled ms/step: {parts};"
              f" {calls / 100:.0f} aten calls/step")


def candidates(cfg, splits, args) -> None:
    """Each candidate change on its own: microseconds per training step (best of 5)."""
    now = time.process_time if args.clock == "cpu" else time.perf_counter

    def us(f, n=100):
        for _ in range(5):
            f()
        best = math.inf
        for _ in range(5):
            t = now()
            for _ in range(n):
                f()
            best = min(best, (now() - t) / n)
        return best * 1e6

    b = cfg.train.batch_size
    x4 = splits.train.x
    x_all = x4.flatten(1)
    idx = torch.randperm(len(x4))[:b]
    gen = torch.Generator().manual_seed(0)
    xu = x_all.index_select(0, idx)
    xf = xu.float().mul_(1 / 255)
    xb = torch.bernoulli(xf)
    model = build(cfg.model, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for kind in ("foreach", "fused", None):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({kind: True} if kind else {"foreach": False}))
        rows.append((f"Adam step, {kind or 'for-loop'}", us(opt.step)))
    rows.append(("zero_grad(set_to_none=True)", us(lambda: opt.zero_grad(set_to_none=True))))
    rows.append(("gather x[idx] on (N,1,28,28) uint8", us(lambda: x4[idx])))
    rows.append(("gather index_select on (N,784) uint8", us(lambda: x_all.index_select(0, idx))))
    rows.append(("uint8 -> float * 1/255", us(lambda: xu.float().mul_(1 / 255))))
    rows.append(("torch.bernoulli(p, generator)", us(lambda: torch.bernoulli(xf, generator=gen))))
    rows.append(("torch.rand(generator) < p", us(lambda: (torch.rand(xf.shape, generator=gen) < xf).float())))
    rows.append(("binarize_u8 (int32 threshold)", us(lambda: binarize_u8(xu, gen))))
    logits = torch.randn(b, x_all.shape[1], requires_grad=True)
    x4b = xb.view(-1, *x4.shape[1:])

    def lik_dist():
        (-Independent(Bernoulli(logits=logits.unflatten(-1, x4.shape[1:]), validate_args=False), 3)
         .log_prob(x4b)).sum().backward()

    rows.append(("log p(x|z): Independent(Bernoulli).log_prob f+b", us(lik_dist)))
    rows.append(("log p(x|z): bce_with_logits f+b",
                 us(lambda: F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1).sum().backward())))
    rows.append(("log p(x|z): softplus((1-2x)l) f+b",
                 us(lambda: F.softplus((1 - 2 * xb) * logits).sum(-1).sum().backward())))
    h = torch.randn(b, 2 * cfg.model.latent_dim, requires_grad=True)

    def kl_dist():
        mu, logvar = h.chunk(2, -1)
        q = Independent(Normal(mu, torch.exp(0.5 * logvar), validate_args=False), 1)
        zero = torch.zeros(mu.shape[-1])
        kl_divergence(q, Independent(Normal(zero, torch.ones_like(zero), validate_args=False), 1)).sum().backward()

    def kl_written_out():  # what elbo_closed does: same distributions, kl_normal_normal's formula inline
        mu, logvar = h.chunk(2, -1)
        q = Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
        zero = torch.zeros(mu.shape[-1])
        normal_kl(q, Normal(zero, torch.ones_like(zero), validate_args=False)).sum(-1).sum().backward()

    def kl_standard():  # specialised to p = N(0, I): 0.5 Σ (μ² + σ² − 1 − log σ²)
        mu, logvar = h.chunk(2, -1)
        (0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)).sum().backward()

    rows.append(("KL: Independent + kl_divergence f+b", us(kl_dist)))
    rows.append(("KL: kl_normal_normal written out f+b", us(kl_written_out)))
    rows.append(("KL: specialised to N(0, I) f+b", us(kl_standard)))
    for bf16 in (False, True):
        ac = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

        def fb():
            with ac:
                parts = elbo(model, x4b)
            parts.loss.mean().backward()

        rows.append((f"elbo fwd+bwd, {'bf16 autocast' if bf16 else 'fp32'}", us(fb)))
    for name, value in rows:
        print(f"  {name:52s} {value:8.1f} us/step  ({value * math.ceil(len(x4) / b) / 1e6:.3f} s/epoch)")
    torch.set_flush_denormal(True)
    rows_fd = us(lambda: elbo(model, x4b).loss.mean().backward())
    torch.set_flush_denormal(False)
    print(f"  {'elbo fwd+bwd fp32, torch.set_flush_denormal(True)':52s} {rows_fd:8.1f} us/step")
    n = len(x4)
    k = 1 if args.clock == "cpu" else 0
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for bs in (32, 64, 128, 256, 512) if threads == 1 else (cfg.train.batch_size,):
            c = cfg.replace(train={"batch_size": bs})
            mkl = time_limit(c, n, torch.float32)[k]
            onednn_fp32_matmuls()
            one = time_limit(c, n, torch.float32)[k]
            torch.backends.mkldnn.matmul.fp32_precision = "none"
            bf16 = time_limit(c, n, torch.bfloat16)[k]
            gf = matmul_flops(c, n) / 1e9
            print(f"  matmul limit, {threads} thread(s), batch {bs:3d}: fp32 MKL {mkl:.3f} s ({gf / mkl:.0f} GFLOP/s),"
                  f" fp32 oneDNN {one:.3f} s ({gf / one:.0f}), bf16 {bf16:.3f} s ({gf / bf16:.0f}) per epoch")


# ---------------------------------------------------------------- one row in a child process


def child(spec: dict) -> dict:
    args = argparse.Namespace(**spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(spec["model"], args)
    splits = load_splits(cfg)
    n = len(splits.train)
    out = {"row": spec["row"], "model": spec["model"], "threads": torch.get_num_threads(), "n": n}
    row = spec["row"]
    setting = onednn_fp32_matmuls() if "onednn" in row else ""
    with OtherLoad() as load:
        if row.startswith("limit"):
            dtype = torch.bfloat16 if "bf16" in row else torch.float32
            wall, cpu = time_limit(cfg, n, dtype)
            out.update(seconds=[wall], cpu=[cpu], flops=matmul_flops(cfg, n))
        else:
            x_valid = valid_set(cfg, splits)
            if row == "plain":
                out.update(row_plain(cfg, splits, x_valid, args))
            elif row == "vaekit streamed":
                with tempfile.TemporaryDirectory() as tmp:
                    out.update(row_fit(cfg, streamed(splits, Path(tmp)), x_valid, args, "fp32"))
            elif row.startswith("vaekit"):
                out.update(row_fit(cfg, splits, x_valid, args, "bf16" if "bf16" in row else "fp32",
                                   args.compile_mode if "compile" in row else None))
            elif row.startswith("proto"):
                out.update(row_proto(cfg, splits, x_valid, args, "bf16" if "bf16" in row else "fp32",
                                     args.compile_mode if "compile" in row else None))
            elif row == "pythae":
                out.update(row_pythae(cfg, splits, x_valid, args))
            elif row == "profile":
                profile_steps(cfg, splits, args)
            elif row == "candidates":
                candidates(cfg, splits, args)
    out["note"] = "; ".join(x for x in (setting, out.get("note", "")) if x)
    out["other_cores"] = load.cores
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


def wait_quiet(max_seconds: float, threads: int) -> float:
    """Wait (up to max_seconds) until other processes leave this row's cores free; return their load."""
    allowed = max(0.0, (os.cpu_count() or 1) - threads) + 0.15
    deadline = time.perf_counter() + max_seconds
    while True:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.cores <= allowed or time.perf_counter() > deadline:
            return load.cores
        time.sleep(4.0)


def run_child(row: str, model: str, args) -> dict:
    if args.wait_quiet:
        wait_quiet(args.wait_quiet, args.threads or torch.get_num_threads())
    spec = json.dumps({"row": row, "model": model, "args": vars(args)})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    for line in lines[:-1]:
        print(line)
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": row, "model": model, "error": tail}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- table


def steady(seconds: list[float]) -> float:
    return sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else seconds[0]


def print_table(model: str, results: list[dict], args) -> None:
    key = "cpu" if args.clock == "cpu" else "seconds"
    limit = next((r for r in results if r["row"] == "limit fp32" and key in r), None)
    plain = next((r for r in results if r["row"] == "plain" and key in r), None)
    t_limit = limit[key][0] if limit else math.nan
    t_plain = steady(plain[key]) if plain else math.nan
    print(f"ratios use {args.clock} seconds" + ("; ONE epoch: s/epoch includes warm-up and compilation"
                                               if args.epochs == 1 else ""))
    print(f"{'row':18s} {'s/epoch':>8s} {'cpu s':>7s} {'1st ep':>7s} {'img/s':>8s} {'/limit':>7s} {'xplain':>7s} "
          f"{'valid ELBO':>10s} {'RSS GiB':>7s} {'others':>6s}  note")
    for r in results:
        if "error" in r:
            print(f"{r['row']:18s} failed: {r['error']}")
            continue
        t = steady(r[key])
        elbo = f"{r['valid_elbo']:10.2f}" if "valid_elbo" in r else f"{'-':>10s}"
        note = r.get("note", "")
        if "flops" in r:
            note = f"{r['flops'] / 1e9:.0f} GFLOP, {r['flops'] / t / 1e9:.0f} GFLOP/s" + (f"; {note}" if note else "")
        if "valid_seconds" in r:
            note = (note + "; " if note else "") + f"minus {r['valid_seconds']:.2f} s/epoch of fit's validation"
        print(f"{r['row']:18s} {steady(r['seconds']):8.3f} {steady(r['cpu']):7.3f} {r['seconds'][0]:7.2f} "
              f"{r['n'] / t:8.0f} {t / t_limit:7.2f} {t_plain / t:7.2f} {elbo} {r['peak_rss_gib']:7.2f} "
              f"{r['other_cores']:6.2f}  {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per row (2: timing; 10+: quality)")
    p.add_argument("--models", default="mlp,iwae", help="comma-separated: mlp, iwae")
    p.add_argument("--rows", default="limit fp32,limit fp32 onednn,limit bf16,plain,vaekit fp32,vaekit bf16,"
                                     "vaekit compile,vaekit streamed,proto fp32,proto fp32 onednn,proto bf16,proto compile onednn,"
                                     "proto bf16 compile,pythae")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    p.add_argument("--quick", action="store_true", help="smoke test: 5000 training images, 1 epoch")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every row (0: torch's default)")
    p.add_argument("--iwae-batch", type=int, default=20, help="batch size of the iwae model (paper: 20)")
    p.add_argument("--profile", action="store_true", help="add a profile of fit's step and the proto step")
    p.add_argument("--candidates", action="store_true", help="add micro-benchmarks of each candidate change")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="seconds the ratios use; 'cpu' (with --threads 1) resists other processes' load")
    p.add_argument("--repeat", type=int, default=1, help="run every row this many times (round-robin); keep the fastest")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each row, wait up to S seconds for other processes to free its cores")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.subset = 5000 if args.quick else None
    if args.quick:
        args.epochs = 1
    rows = [r.strip() for r in args.rows.split(",")]
    if args.skip_compile:
        rows = [r for r in rows if "compile" not in r]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads per row: {args.threads or torch.get_num_threads()},"
          f" epochs {args.epochs}{' (quick: 5000 images)' if args.quick else ''}, load average "
          f"{os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')};"
          " each row in its own subprocess")
    if "pythae" in rows:
        try:
            import pythae  # noqa: F401
        except ImportError:
            print("pythae not installed: skipped")
            rows.remove("pythae")
    for model in [m.strip() for m in args.models.split(",")]:
        cfg = model_config(model, args)
        print(f"\n== {model}: {'-'.join(str(s) for s in [784, *cfg.model.hidden, cfg.model.latent_dim])} "
              f"{cfg.model.activation}, batch {cfg.train.batch_size}, dynamic binarization ==")
        best: dict[str, dict] = {}
        key = "cpu" if args.clock == "cpu" else "seconds"
        for rep in range(args.repeat):  # rows round-robin, so slow drift of the host hits all rows alike
            for row in rows:
                r = run_child(row, model, args)
                status = r.get("error") or f"{steady(r[key]):.3f} s/epoch ({args.clock})"
                print(f"  .. {row}{f' (round {rep + 1})' if args.repeat > 1 else ''}: {status}", flush=True)
                if row not in best or "error" in best[row] or ("error" not in r and steady(r[key]) < steady(best[row][key])):
                    best[row] = r
        results = [best[row] for row in rows]
        print_table(model, results, args)
        if args.profile:
            print(f"\nprofile ({model}, 100 steps after 20 warm-up):")
            print(run_child("profile", model, args).get("error", ""))
        if args.candidates:
            print(f"\ncandidates ({model}):")
            print(run_child("candidates", model, args).get("error", ""))
    print(f"\npeak RSS of this parent process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
          " (each row's own peak is in its column)")


if __name__ == "__main__":
    main()
