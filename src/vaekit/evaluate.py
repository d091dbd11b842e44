"""Evaluation: named quantities, each saying what it measured.

nll          −log p(x) in nats, estimated by importance sampling with q(z|x) as the
             proposal (Burda et al. 2015, eq. 8 with k samples; the IWAE bound L_k):
                 log p̂(x) = logsumexp_i [log p(x|z_i) + log p(z_i) − log q(z_i|x)] − log k,
                 z_i ~ q(z|x).
             E[log p̂(x)] ≤ log p(x) (Jensen) and the gap closes as k grows; k = 5000
             is the usual protocol. So the reported nll is, in expectation, an upper
             bound on the true −log p(x).
nelbo        −ELBO with one z-sample and the closed-form KL (objectives.elbo).
bits/dim     nll / (n_dims · ln 2).
active units Burda et al. 2015, §5.2: dim j is active if Cov_x(E_q[z_j]) > 0.01.

Everything is computed on the model's device, batch by batch; each result names
its estimator and k. Randomness comes from `torch.random.fork_rng` seeded with
`seed`, so a run is repeatable and the caller's global RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch.distributions import Bernoulli, Distribution, Independent, Normal
from tqdm.auto import tqdm

from vaekit.cpu import keep_freed_memory
from vaekit.distributions import seeded
from vaekit.errors import ConfigError
from vaekit.models.common import as_input
from vaekit.objectives import check_count, decode, elbo, encode, kl_per_dim

ESTIMATOR = "importance sampling, proposal q(z|x)"
PRECISIONS = ("fp32", "bf16")

# Decoder output (float32) held at once by log_px. Measured (bench/eval_speed.py
# and one-thread CPU time; both MLP models, fp32 and bf16): on a 2-core CPU with
# a 32 MiB L3, 1-8 MiB chunks run at the same speed; 16 MiB is up to 1.2x and
# 32 MiB up to 1.5x slower, as the logits and their temporaries leave the cache
# and glibc starts returning the freed blocks to the kernel (a page fault per
# 4 KiB on the next allocation). On a 2-core Intel Xeon (2 MiB L2 per core; fp32),
# 4 MiB is the fastest: 2 MiB is 1.05x, 1 MiB 1.12-1.17x, 6-8 MiB 1.00-1.13x slower.
CHUNK_BYTES = 4 * 2**20
# Random numbers drawn per RNG call. The calls (and so the samples) depend on
# k, the batch and this constant, never on chunk_size, so chunking cannot
# change a seeded result.
_RNG_BLOCK = 2**20


def _device(model) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_labels(model, y: torch.Tensor | None) -> None:
    """Labels are for a conditional model only: given to another, they would be ignored, and a
    number reported as log p(x|y) would be log p(x)."""
    cfg = getattr(model, "cfg", None)  # a vaekit model's ModelConfig (a hand-made model may have none)
    if y is not None and cfg is not None and not cfg.n_classes:
        raise ConfigError("labels y were given, but this model is not conditional: it takes none. "
                          "Drop y (or train a conditional model for log p(x|y)).")


def _draws(sample: Callable[[tuple[int, ...]], torch.Tensor], per_draw: int, k: int, chunk_size: int):
    """Yield k draws of sample((m,)) in tensors of (n ≤ chunk_size, ...), each RNG call of a fixed size.

    per_draw: the numbers one draw takes (B·D for z of shape (B, D)).
    """
    block = max(1, min(k, _RNG_BLOCK // max(1, per_draw)))
    pending: list[torch.Tensor] = []  # drawn, not yet yielded
    have = drawn = 0
    for start in range(0, k, chunk_size):
        n = min(chunk_size, k - start)
        while have < n:
            m = min(block, k - drawn)
            pending.append(sample((m,)))
            drawn += m
            have += m
        z = torch.cat(pending) if len(pending) > 1 else pending[0]
        pending = [z[n:]] if len(z) > n else []
        have -= n
        yield z[:n]


class _GaussianProposal:
    """q(z|x) = N(μ, diag σ²) against the prior p(z) = N(0, I): z drawn as μ + σ·ε, keeping ε.

    Then log p(z) − log q(z|x) = Σ_d (ε_d² − z_d²)/2 + Σ_d log σ_d (the log 2π terms cancel):
    a few passes over (n, B, D) where two Normal.log_prob calls take about fifteen, and no
    (z − μ)/σ to recompute. ε comes from torch.randn with the shapes and RNG calls q.sample
    would use, and z = ε·σ + μ is rounded as torch.normal(μ, σ) rounds it, so the samples
    are bitwise those of q.sample (tests/test_evaluate.py checks this).
    """

    def __init__(self, q: Independent):
        self.loc, self.scale = q.base_dist.loc, q.base_dist.scale  # batch + event shape
        self.dims = q.reinterpreted_batch_ndims
        self.log_det = self.scale.log().flatten(-self.dims).sum(-1)  # Σ log σ, batch shape

    @classmethod
    def of(cls, q: Distribution, prior: Distribution) -> _GaussianProposal | None:
        """The fast form, or None unless q is an Independent Normal and the prior N(0, I) on the same event."""
        def normal(d):
            return isinstance(d, Independent) and type(d.base_dist) is Normal
        if not (normal(q) and normal(prior) and q.event_shape == prior.event_shape
                and q.reinterpreted_batch_ndims == prior.reinterpreted_batch_ndims):
            return None
        p = prior.base_dist
        if not (bool((p.loc == 0).all()) and bool((p.scale == 1).all())):
            return None
        return cls(q)

    def eps(self, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """ε ~ N(0, I) of shape sample_shape + batch + event, as q.sample(sample_shape) would draw it."""
        return torch.randn((*sample_shape, *self.loc.shape), dtype=self.loc.dtype, device=self.loc.device)

    def z(self, eps: torch.Tensor) -> torch.Tensor:
        return (eps * self.scale).add_(self.loc)

    def log_ratio(self, eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(z) − log q(z|x) for z = μ + σ·ε: shape (n, *batch)."""
        return (eps - z).mul_(eps + z).flatten(-self.dims).sum(-1).mul_(0.5).add_(self.log_det)


class _BinaryBernoulli:
    """log p(x|z) for binary x under a Bernoulli decoder, faster than Bernoulli.log_prob.

    log Bernoulli(x; logit l) = x·l − softplus(l) = −softplus(s·l) with s = 1 − 2x: one
    multiply and one softplus over the (n, B, *shape) logits, then the sum over the pixels
    (in float32, or float64 for a float64 model; also under bf16 autocast, where the model
    has cast its logits to float32). Bernoulli.log_prob (binary_cross_entropy_with_logits
    after broadcasting x) makes about four passes.

    On CPU the softplus is computed as log(1 + e^y), in place: exp, +1, log. torch.logaddexp
    (y, 0) and F.softplus are far slower there (one thread, 13 × 100 × 784 logits: multiply,
    softplus and sum take 2.2 ms that way, 1.2 ms this way). 1 + e^y drops e^y < 6e-8, an
    error below 6e-8 nats per pixel. If e^y overflows (y > 88.7 in float32) the sum is +inf:
    that chunk is redone with logaddexp, so no result depends on the shortcut. Elsewhere
    (CUDA) logaddexp, with no check that would wait for the device.

    Everything is written into one buffer kept from chunk to chunk: on CPU a fresh multi-MiB
    tensor can cost a page fault per 4 KiB (glibc hands large freed blocks back to the kernel).

    tests/test_evaluate.py checks it against Bernoulli.log_prob.
    """

    def __init__(self, x: torch.Tensor):
        self.sign = 1 - 2 * x  # (B, *shape)
        self.buf: torch.Tensor | None = None  # (chunk, B, *shape) scratch

    def __call__(self, p_x: Distribution) -> torch.Tensor | None:
        """(n, B) log-likelihoods, or None if p_x is not an Independent Bernoulli."""
        if not (isinstance(p_x, Independent) and isinstance(p_x.base_dist, Bernoulli)):
            return None
        logits, dims = p_x.base_dist.logits, p_x.reinterpreted_batch_ndims
        dtype = torch.promote_types(logits.dtype, torch.float32)
        buf = self.buf
        if buf is None or buf.shape[1:] != logits.shape[1:] or len(buf) < len(logits) or buf.dtype != dtype:
            buf = self.buf = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        y = torch.mul(logits, self.sign, out=buf[:len(logits)])
        if y.device.type == "cpu":
            out = y.exp_().add_(1).log_().flatten(-dims).sum(-1)  # softplus(y) = log(1 + e^y)
            if bool(torch.isfinite(out).all()):
                return out.neg_()
            y = torch.mul(logits, self.sign, out=y)  # e^y overflowed, or the logits hold inf/NaN
        torch.logaddexp(y, y.new_zeros(()), out=y)  # softplus(y) = log(e^y + e^0), overflow-free
        return y.flatten(-dims).sum(-1).neg_()


def _log_lik(model, x: torch.Tensor, z: torch.Tensor, fast: _BinaryBernoulli | None,
             y: torch.Tensor | None) -> torch.Tensor:
    """log p(x|z) for z of shape (n, B, D): (n, B), from `fast` where it applies."""
    p_x = decode(model, z, y)
    log_lik = fast(p_x) if fast is not None else None
    return p_x.log_prob(x) if log_lik is None else log_lik


def _log_weights(model, x: torch.Tensor, q: Distribution, z: torch.Tensor,
                 fast: _BinaryBernoulli | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x|z) + log p(z) − log q(z|x) for z of shape (n, B, D): returns (n, B).

    objectives.log_weights, with log p(x|z) from `fast` where it applies.
    """
    return _log_lik(model, x, z, fast, y) + model.prior().log_prob(z) - q.log_prob(z)


@torch.no_grad()
def log_px(model, x: torch.Tensor, k: int = 5000, *, y: torch.Tensor | None = None, chunk_size: int | None = None,
           precision: str = "fp32", progress: bool = False, seed: int | None = None) -> torch.Tensor:
    """Importance-sampled estimates of log p(x), shape (B,), for a batch x of shape (B, *shape).

    log p̂(x) = logsumexp_i log w_i − log k, w_i = p(x, z_i) / q(z_i|x), z_i ~ q(z|x),
    i = 1..k (Burda et al. 2015); for a conditional model, log p(x|y) given labels y (B,).
    x is encoded once; the k samples are decoded
    `chunk_size` at a time for all B images together (default: as many as keep
    the decoder output near CHUNK_BYTES), and the chunks are combined by a
    running logsumexp, in float32 (float64 if the model computes in float64).

    precision "bf16" runs the model under torch.autocast(bfloat16): the decoder's
    matrix products in bf16, its output and every log-prob in float32.

    seed: an int draws the samples from a forked, seeded RNG (the global RNG is
    untouched, and the same seed, k and batch give the same result for any
    chunk_size); None draws from the global RNG.
    """
    check_count(k, "k (importance samples per image)")
    check_count(chunk_size, "chunk_size", optional=True)
    _check_labels(model, y)
    x = as_input(model, x)
    device = _device(model)
    if device.type == "cpu":
        keep_freed_memory()  # each chunk's temporaries reuse the last chunk's pages (vaekit.cpu)
    x = x.to(device)
    y = None if y is None else y.to(device)
    batch = x.shape[0]
    if batch == 0:
        return x.new_zeros(0, dtype=torch.promote_types(x.dtype, torch.float32))
    chunk_size = min(chunk_size or default_chunk_size(batch, tuple(x.shape[1:])), k)
    autocast = _autocast(precision, device)
    fast = _BinaryBernoulli(x) if is_binary(x) else None
    bar = tqdm(total=k, unit="sample", disable=not progress, leave=False)
    acc = None  # running logsumexp of the log-weights so far, (B,)
    with _eval_mode(model), seeded(seed, device):
        q = encode(model, x, y)  # batch shape (B,); full precision whatever `precision`: it runs once
        gauss = _GaussianProposal.of(q, model.prior())
        sample = q.sample if gauss is None else gauss.eps
        per_draw = q.batch_shape.numel() * max(1, q.event_shape.numel())
        with autocast:  # entered once, so each weight is cast to bf16 once
            for draw in _draws(sample, per_draw, k, chunk_size):  # z or ε: (n, B, D)
                if gauss is None:
                    lw = _log_weights(model, x, q, draw, fast, y)  # (n, B)
                else:
                    z = gauss.z(draw)
                    lw = _log_lik(model, x, z, fast, y) + gauss.log_ratio(draw, z)
                part = torch.logsumexp(lw.to(torch.promote_types(lw.dtype, torch.float32)), dim=0)
                acc = part if acc is None else torch.logaddexp(acc, part)
                bar.update(len(draw))
    bar.close()
    return acc - math.log(k)


def is_binary(x: torch.Tensor) -> bool:
    """True if every value of x is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def default_chunk_size(n_images: int, shape: tuple[int, ...]) -> int:
    """Samples per decoder call in log_px: float32 output of about CHUNK_BYTES for n_images images."""
    return max(1, CHUNK_BYTES // (4 * math.prod(shape) * n_images))


def default_batch_size(k: int, shape: tuple[int, ...]) -> int:
    """Images per log_px call: 100, or more when k is small, so that a chunk still fills about CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (4 * math.prod(shape)))  # decoder outputs per chunk
    return max(100, rows // k)


@torch.no_grad()
def nll_per_image(model, x_all: torch.Tensor, k: int = 5000, *, y_all: torch.Tensor | None = None,
                  batch_size: int | None = None, precision: str = "fp32", progress: bool = True,
                  seed: int | None = 0) -> torch.Tensor:
    """−log p̂(x) of each image (log_px with k samples), in nats: (N,) float64 on the CPU.

    x_all (N, *shape) may live on the CPU; batches are moved to the model's device.
    The result depends on (seed, k, batch_size), not on how log_px chunks the samples.
    """
    check_count(k, "k (importance samples per image)")
    check_count(batch_size, "batch_size", optional=True)
    n = len(x_all)
    if n == 0:
        raise ConfigError("estimating log p(x) needs at least one image; x_all is empty.")
    device = _device(model)
    batch_size = batch_size or default_batch_size(k, tuple(x_all.shape[1:]))
    parts = []
    with _eval_mode(model), seeded(seed, device):
        bar = tqdm(total=n, unit="img", disable=not progress, desc=f"log p(x), k={k}")
        for rows in _batches(n, batch_size):
            parts.append(log_px(model, x_all[rows], k, y=_rows(y_all, rows),
                                precision=precision).double().cpu())
            bar.update(rows.stop - rows.start)
        bar.close()
    return -torch.cat(parts)


def estimate_nll(model, x_all: torch.Tensor, k: int = 5000, *, y_all: torch.Tensor | None = None,
                 batch_size: int | None = None, precision: str = "fp32", progress: bool = True,
                 seed: int | None = 0, per_image: bool = False) -> dict:
    """The mean of −log p̂(x) over x_all (nll_per_image), in nats, with its standard error;
    per_image=True adds the (N,) values themselves as "nll_per_image"."""
    nll = nll_per_image(model, x_all, k, y_all=y_all, batch_size=batch_size, precision=precision,
                        progress=progress, seed=seed)
    n = len(nll)
    return {
        "nll": nll.mean().item(),
        "nll_stderr": _stderr(nll),
        "k": k,
        "n_images": n,
        "precision": precision,
        "estimator": ESTIMATOR,
        **({"nll_per_image": nll} if per_image else {}),
    }


def _rows(y_all: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if y_all is None else y_all[rows]


def _stderr(v: torch.Tensor) -> float:
    return (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")


@torch.no_grad()
def elbo_terms(model, x_all: torch.Tensor, *, y_all: torch.Tensor | None = None, batch_size: int = 1000,
               seed: int | None = 0) -> dict:
    """Means over the set of −ELBO, its reconstruction term and its KL, in nats.

    One z-sample per image (from a forked RNG seeded with `seed`), closed-form KL.
    kl_per_dim is the closed-form KL of each latent dimension, averaged over the
    set; None when q(z|x) and p(z) are not factorised (Independent) distributions.
    """
    _check_labels(model, y_all)
    device = _device(model)
    nelbo, recon, kl, kl_dims = [], [], [], []
    with _eval_mode(model), seeded(seed, device):
        for rows in _batches(len(x_all), batch_size):
            x = as_input(model, x_all[rows]).to(device)
            y = None if y_all is None else y_all[rows].to(device)
            parts = elbo(model, x, y=y)
            nelbo.append(-parts.elbo.double().cpu())
            recon.append(parts.distortion.double().cpu())
            kl.append(parts.rate.double().cpu())
            kl_dims.append(_kl_per_dim(encode(model, x, y), model.prior()))
    nelbo = torch.cat(nelbo)
    out = {
        "nelbo": nelbo.mean().item(),
        "nelbo_stderr": _stderr(nelbo),
        "recon": torch.cat(recon).mean().item(),
        "kl": torch.cat(kl).mean().item(),
        "kl_per_dim": None,
    }
    if all(d is not None for d in kl_dims):
        out["kl_per_dim"] = torch.cat(kl_dims).mean(0).tolist()
    return out


def _kl_per_dim(q: Distribution, prior: Distribution) -> torch.Tensor | None:
    """(B, D) closed-form KL per latent dimension, or None if either side is not Independent."""
    if not (isinstance(q, Independent) and isinstance(prior, Independent)):
        return None
    return kl_per_dim(q, prior).flatten(1).double().cpu()


ACTIVE = 0.01  # Burda et al.'s threshold on Cov_x(E_q[u]) for an active unit


@torch.no_grad()
def active_units(model, x_all: torch.Tensor, threshold: float = ACTIVE, batch_size: int = 1000,
                 y_all: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """Burda et al. 2015, §5.2: A_u = Cov_x(E_q[u]) > threshold, per latent dimension.

    Returns (number of active dims, (D,) float64 variances over x of q's mean;
    population variance, i.e. divided by N).
    """
    _check_labels(model, y_all)
    device = _device(model)
    means = []
    with _eval_mode(model):
        for rows in _batches(len(x_all), batch_size):
            y = None if y_all is None else y_all[rows].to(device)
            means.append(encode(model, as_input(model, x_all[rows]).to(device), y).mean.double().cpu())
    means = torch.cat(means).flatten(1)  # (N, D)
    var = means.var(dim=0, correction=0)
    return int((var > threshold).sum()), var


def bits_per_dim(nll_nats: float, n_dims: int) -> float:
    """Nats per example to bits per data dimension."""
    return nll_nats / (n_dims * math.log(2))


def evaluate(model, x_all: torch.Tensor, *, y_all: torch.Tensor | None = None, k: int = 5000,
             precision: str = "fp32", batch_size: int | None = None, seed: int | None = 0,
             progress: bool = True, per_image: bool = False) -> dict:
    """nll (IS, k samples) with stderr, nelbo/recon/kl, bits/dim, active units, in one dict.

    y_all: the labels, needed by a conditional model (whose nll is then −log p(x|y)).
    per_image: also each image's −log p̂(x), a tensor under "nll_per_image" (estimate_nll).
    bits_per_dim only for binary x under a Bernoulli decoder (or a model without a vaekit
    config): the nll of a Gaussian decoder is of a density, which is not a number of bits.
    """
    n_dims = math.prod(x_all.shape[1:])
    out = estimate_nll(model, x_all, k, y_all=y_all, batch_size=batch_size, precision=precision,
                       progress=progress, seed=seed, per_image=per_image)
    out.update(elbo_terms(model, x_all, y_all=y_all, seed=seed))
    count, var = active_units(model, x_all, y_all=y_all)
    cfg = getattr(model, "cfg", None)
    if (cfg is None or cfg.likelihood == "bernoulli") and is_binary(as_input(model, x_all)):
        out["bits_per_dim"] = bits_per_dim(out["nll"], n_dims)
    out["active_units"] = count
    if cfg is not None and cfg.arch == "mlp2":  # the code is [z1, z2]; Burda et al. count each layer
        out["active_units_z1"] = int((var[: cfg.latent1_dim] > ACTIVE).sum())
        out["active_units_z2"] = int((var[cfg.latent1_dim :] > ACTIVE).sum())
    return out
