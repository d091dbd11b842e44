"""How fast is the importance-sampled log p(x) (vaekit.evaluate), against its limits?

    python bench/eval_speed.py [--n-images N] [--k K] [--precision fp32|bf16|both] [--profile]

Defaults: the 10k MNIST test images, k = 5000, both precisions, two models
(784-400-20 ReLU as in pytorch/examples; 784-200-200-50 tanh as in IWAE),
each trained for --train-epochs (default 1) by a plain Adam loop here, so that
the fp32/bf16 nll comparison is made on a model that has learnt something.

For each model and precision, from this one run:
  seconds, images/s        evaluate.estimate_nll over the whole set
  matmul limit             the same decoder matrix products alone: torch.addmm
                           chains with the shapes and counts log_px uses, into
                           preallocated outputs; no sampling, no activations, no
                           log-probs. Timed on --limit-fraction of the chunks (half
                           just before the run, half just after) and scaled.
                           fp32 has two: the default path (MKL's sgemm), which is
                           what log_px runs, and oneDNN's fp32 kernels (as
                           vaekit.train.onednn_fp32_matmuls routes them, where they
                           stay exactly fp32), which can be faster or slower
                           depending on the CPU. The ratio to the path log_px
                           takes is the fair one; the other is shown beside it.
  ratio                    seconds / limit
  per-image loop           one image at a time, its own encoder pass for every
                           chunk of 100 samples (as Pythae's get_nll does), timed
                           on --loop-images images and scaled to the set.
and fp32 vs bf16: seconds, speedup and the difference in mean nll (same seed,
so the two see the same z-samples and differ only by precision), beside the
ceiling on that speedup here: the fp32 limit over the bf16 one (on a CPU
without fast bf16 matrix units the bf16 products can be slower than fp32).

Each time is given as wall seconds and as CPU seconds of this process. The
machine's load average is printed beside them: on a shared machine other
processes slow every number here, the limit included, and with more threads
than free cores the wall times mostly measure waiting. `--threads 1` then gives
the steadiest ratios (CPU time of one thread is close to its work), and the
targets below are judged on CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import time
from collections import Counter

import torch
from torch import nn

from vaekit import evaluate as ev
from vaekit.config import ModelConfig
from vaekit.models import build
from vaekit.objectives import elbo, log_weights
from vaekit.train import _onednn_keeps_fp32, onednn_fp32_matmuls

MODELS = {
    "784-400-20 relu": ModelConfig(latent_dim=20, hidden=(400,), activation="relu"),
    "784-200-200-50 tanh": ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh"),
}


def load(n_test: int, fetch: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(test images binarized once with `seed`, training images in [0, 1], a line saying which)."""
    g = torch.Generator().manual_seed(seed)
    try:
        from vaekit.data import binarize, load_mnist

        test, train = load_mnist("test", fetch=fetch), load_mnist("train", fetch=fetch)
        x_test = binarize(test.float()[:n_test], g)
        return x_test, train.float(), f"MNIST test, first {len(x_test)} images, binarized once (seed {seed})"
    except Exception as e:  # noqa: BLE001 - any failure means "no MNIST here": say so and go on
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        x_test = torch.bernoulli(torch.full((n_test, 1, 28, 28), 0.13), generator=g)
        x_train = torch.rand(50_000, 1, 28, 28, generator=g) * 0.26
        return x_test, x_train, (f"RANDOM binary images (p = 0.13), not MNIST ({why}); "
                                 "timings are valid, nll values are not comparable to the literature")


class Timer:
    """Wall and process-CPU seconds of a `with` block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def train(model, x_train: torch.Tensor, epochs: int, batch_size: int = 100, seed: int = 0) -> float:
    """Plain Adam on the ELBO with dynamic binarization; returns the last epoch's mean −ELBO."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for start in range(0, len(order), batch_size):
            x = torch.bernoulli(x_train[order[start:start + batch_size]], generator=g)
            loss = elbo(model, x).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        mean = total / len(order)
    model.eval()
    return mean


def chunk_plan(n: int, k: int, shape: tuple[int, ...]) -> Counter:
    """{rows per decoder call: number of calls} exactly as estimate_nll/log_px chunk the work."""
    plan: Counter = Counter()
    batch = ev.default_batch_size(k, shape)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        cs = min(k, ev.default_chunk_size(b, shape))
        plan[cs * b] += k // cs
        if k % cs:
            plan[(k % cs) * b] += 1
    return plan


def time_limit(model, plan: Counter, dtype: torch.dtype, fraction: float,
               onednn: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of the decoder's addmm chain alone over `plan` (timed on `fraction` of the calls, scaled).

    onednn: fp32 matmuls on oneDNN, as vaekit.train.onednn_fp32_matmuls routes them (call only
    where _onednn_keeps_fp32()); otherwise torch's default path (MKL for fp32, oneDNN for bf16).
    """
    layers = [m for m in model.decoder if isinstance(m, nn.Linear)]
    weights = [(m.weight.detach().to(dtype).t(), m.bias.detach().to(dtype)) for m in layers]
    wall = cpu = 0.0
    for rows, count in plan.items():
        h = [torch.randn(rows, layers[0].in_features).to(dtype)]
        h += [torch.empty(rows, m.out_features, dtype=dtype) for m in layers]
        reps = max(1, round(count * fraction))
        with onednn_fp32_matmuls() if onednn else contextlib.nullcontext():
            for i, (w, b) in enumerate(weights):  # warm-up
                torch.addmm(b, h[i], w, out=h[i + 1])
            with Timer() as t:
                for _ in range(reps):
                    for i, (w, b) in enumerate(weights):
                        torch.addmm(b, h[i], w, out=h[i + 1])
        wall += t.wall * count / reps
        cpu += t.cpu * count / reps
    return wall, cpu


class Limit:
    """A matmul limit timed half before and half after the run: (wall, CPU) averages and the two walls."""

    def __init__(self, before: tuple[float, float], after: tuple[float, float]):
        self.wall, self.cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        self.before, self.after = before[0], after[0]

    def describe(self, t: Timer) -> str:
        return (f"{self.wall:7.1f} s ({self.cpu:7.1f}) [before {self.before:.1f}, after {self.after:.1f}], "
                f"ratio {t.wall / self.wall:.2f}x ({t.cpu / self.cpu:.2f}x)")


@torch.no_grad()
def per_image_loop(model, x: torch.Tensor, k: int, chunk: int = 100) -> Timer:
    """Wall and CPU seconds for the Pythae-style loop: one image at a time, encoder rerun per chunk."""
    with Timer() as t:
        for i in range(len(x)):
            lw = []
            for start in range(0, k, chunk):
                x_rep = x[i:i + 1].expand(min(chunk, k - start), *x.shape[1:])
                q = model.encode(x_rep)
                lw.append(log_weights(model, x_rep, q, q.sample().unsqueeze(0)).squeeze(0))
            (torch.logsumexp(torch.cat(lw), 0) - math.log(k)).item()
    return t


def profile(model, x: torch.Tensor, k: int, precision: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ev.log_px(model, x, min(k, 50), precision=precision)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ev.log_px(model, x, k, precision=precision, seed=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=32))


def load_avg() -> str:
    return "load %.1f" % os.getloadavg()[0]


def cpu_name() -> str:
    """The CPU's model name (Linux), for the header: which path is fastest depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=10_000)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--train-epochs", type=int, default=1, help="0 keeps the random initialisation")
    p.add_argument("--train-images", type=int, default=50_000)
    p.add_argument("--limit-fraction", type=float, default=0.25)
    p.add_argument("--loop-images", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--fetch", action="store_true", help="download MNIST if it is not cached")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables for one batch")
    args = p.parse_args()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x_test, x_train, source = load(args.n_images, args.fetch)
    x_train = x_train[:args.train_images]
    n, shape = len(x_test), tuple(x_test.shape[1:])
    plan = chunk_plan(n, args.k, shape)
    batch = ev.default_batch_size(args.k, shape)
    print(f"data: {source}")
    onednn = _onednn_keeps_fp32()
    # log_px leaves fp32 matmuls on torch's default path (MKL) unless the caller has routed them.
    default_path = ("oneDNN" if torch.backends.mkldnn.matmul.fp32_precision == "bf16"
                    else "MKL" if torch.backends.mkl.is_available() else "BLAS")
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; k={args.k}, {n} images, batches of {batch}, "
          f"chunks of {min(args.k, ev.default_chunk_size(batch, shape))} samples "
          f"(rows per decoder call: {dict(plan)}); times are wall s (CPU s)")
    results, limits = {}, {}
    for name in args.models.split(","):
        # Each model's initialisation and training start from seed 0, whatever ran before it
        # (the limits and the per-image loop draw from the global RNG).
        torch.manual_seed(0)
        model = build(MODELS[name])
        if args.train_epochs:
            with Timer() as t:
                loss = train(model, x_train, args.train_epochs)
            state = (f"trained {args.train_epochs} epoch(s) on {len(x_train)} images in {t.wall:.0f} s, "
                     f"last-epoch mean −ELBO {loss:.2f}")
        else:
            state = "random initialisation"
        print(f"\n== {name} ({state})")
        for prec in precisions:
            dtype = torch.float32 if prec == "fp32" else torch.bfloat16
            la = load_avg()
            # Each limit is timed on half the sampled chunks just before the run and half just
            # after, so that a change in the machine's load shows up as two different numbers.
            variants = [False, True] if prec == "fp32" and onednn else [False]
            before = {v: time_limit(model, plan, dtype, args.limit_fraction / 2, v) for v in variants}
            with Timer() as t:
                r = ev.estimate_nll(model, x_test, args.k, precision=prec, progress=False, seed=0)
            after = {v: time_limit(model, plan, dtype, args.limit_fraction / 2, v) for v in variants}
            limits[name, prec] = {v: Limit(before[v], after[v]) for v in variants}
            results[name, prec] = (t, r["nll"])
            print(f"  {prec}: {t.wall:7.1f} s ({t.cpu:7.1f}) {n / t.wall:7.1f} img/s | nll {r['nll']:.3f} ± "
                  f"{r['nll_stderr']:.3f} | {la} → {load_avg()}", flush=True)
            if prec == "fp32":
                print(f"        matmul limit, {default_path} (the path log_px takes): "
                      f"{limits[name, prec][False].describe(t)}")
                if onednn:
                    print(f"        matmul limit, oneDNN fp32 (onednn_fp32_matmuls; not used by log_px): "
                          f"{limits[name, prec][True].describe(t)}")
                else:
                    print("        matmul limit, oneDNN fp32: n/a (oneDNN would round fp32 matmuls to bf16 here)")
            else:
                print(f"        matmul limit, bf16 (oneDNN): {limits[name, prec][False].describe(t)}")
        if len(precisions) == 2:
            (t32, nll32), (t16, nll16) = results[name, "fp32"], results[name, "bf16"]
            ceiling = limits[name, "fp32"][False].cpu / limits[name, "bf16"][False].cpu
            print(f"  bf16 vs fp32: {t32.wall:.1f} s → {t16.wall:.1f} s, speedup {t32.wall / t16.wall:.2f}x "
                  f"({t32.cpu / t16.cpu:.2f}x in CPU time; the matmuls alone: {ceiling:.2f}x), "
                  f"nll(bf16) − nll(fp32) = {nll16 - nll32:+.4f} nats")
        m = min(args.loop_images, n)
        per = per_image_loop(model, x_test[:m], args.k)
        ours = results.get((name, "fp32"), results[name, precisions[0]])[0]
        print(f"  per-image loop (Pythae-style, encoder per 100-sample chunk, fp32): {per.wall / m:.2f} s/img "
              f"({per.cpu / m:.2f}) on {m} images → {per.wall / m * n:.0f} s for {n}; ours is "
              f"{per.wall / m * n / ours.wall:.1f}x faster ({per.cpu / m * n / ours.cpu:.1f}x in CPU time) "
              f"| {load_avg()}", flush=True)
        if args.profile:
            for prec in precisions:
                print(f"  profile, {prec}, one batch of {batch} images, k={min(args.k, 1000)}:")
                profile(model, x_test[:batch], min(args.k, 1000), prec)
    # One thread: CPU time is the work, whatever else runs on the machine. More threads: wall time.
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    print(f"\ntargets (issue 'Honest likelihood'), judged on {'CPU' if clock == 'cpu' else 'wall'} time: fp32 "
          "within 1.3x of the matmul limit; bf16 >= 3x faster than fp32 with |nll(bf16) - nll(fp32)| <= 0.05 nats")
    for name in args.models.split(","):
        if (name, "fp32") in results:
            t32 = getattr(results[name, "fp32"][0], clock)
            ratio = t32 / getattr(limits[name, "fp32"][False], clock)
            other = (f"; {t32 / getattr(limits[name, 'fp32'][True], clock):.2f}x of the oneDNN fp32 limit"
                     if True in limits[name, "fp32"] else "")
            print(f"  {name}: fp32 {ratio:.2f}x of the {default_path} limit, the path it runs "
                  f"({'met' if ratio <= 1.3 else 'NOT met'}){other}")
        if len(precisions) == 2:
            (t32, nll32), (t16, nll16) = results[name, "fp32"], results[name, "bf16"]
            speedup, dnll = getattr(t32, clock) / getattr(t16, clock), abs(nll16 - nll32)
            ceiling = getattr(limits[name, "fp32"][False], clock) / getattr(limits[name, "bf16"][False], clock)
            print(f"  {name}: bf16 speedup {speedup:.2f}x ({'met' if speedup >= 3 else 'NOT met'}; the bf16 "
                  f"matmuls alone: {ceiling:.2f}x the speed of the fp32 ones here), |Δnll| {dnll:.4f} "
                  f"({'met' if dnll <= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
