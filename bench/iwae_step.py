"""Time one IWAE training step (DReG, `--compile`) several ways, side by side in one process.

    python bench/iwae_step.py --row iwae-2l-k50 --grad-samples 0 2 4 8
    python bench/iwae_step.py --row iwae-2l-k50 --grad-samples 0 4 --hooked
    python bench/iwae_step.py --row iwae-1l-k50 --log-q both
    python bench/iwae_step.py --row iwae-2l-k50 --grad-samples 4 --blocks 3 --profile 100
    python bench/iwae_step.py --row iwae-2l-k50 --grad-samples 4 --precision fp32 bf16

Each variant is a model of the row's architecture (softplus, batch 20 by default) with its own
Adam and its own compiled loss, trained on one fixed binarized batch. The variants take turns
in blocks of 100 steps, so a slow minute of the machine falls on all of them; the median block
is reported, with each variant's speed relative to the first. With --profile N, N more steps of
the last variant then run under torch.profiler, and its operators are listed by their own time.

Variants: each --grad-samples value (0: the backward pass through all k samples) in each
--precision, as `--compile` trains it (the whole step one compiled function,
objectives.dreg_from_noise; bf16 under autocast, as `--precision bf16` trains). With --hooked,
first, each of them the way `--compile` trained up to commit 2c33f6d: DReG's hook on z
and the sampling outside the compiled graphs, which were the decoder with log q and, with
--grad-samples, the forward pass over all k samples. With --log-q both, first of all, DReG's log
q with fixed parameters the older way (torch.func.functional_call, which torch.compile splits
into several graphs; the other variants take it from q's detached distribution), all k samples
and hooked.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import paper_table  # noqa: E402  (this directory: the rows' configs)

from vaekit import objectives  # noqa: E402
from vaekit.cpu import keep_freed_memory  # noqa: E402
from vaekit.distributions import draw_noise, from_noise  # noqa: E402
from vaekit.evaluate import PRECISIONS  # noqa: E402
from vaekit.models import build  # noqa: E402
from vaekit.train import compiled_loss, flush_denormals  # noqa: E402


def functional_call_terms(model, x, y, z):
    """dreg_terms with log q through torch.func.functional_call (the code before 2026-11-27)."""
    return objectives.decode(model, z, y).log_prob(x), \
        model.prior().log_prob(z) - objectives._log_q_functional(model, x, y, z)


def hooked_terms(model, x, y, eps):
    """log p(x|z) and log p(z) − log q(z|x) over all k samples from their noise, no graph: the
    forward pass that was compiled on its own up to commit 2c33f6d."""
    q = objectives.encode(model, x, y)
    z = from_noise(q, eps)
    return objectives.decode(model, z, y).log_prob(x), model.prior().log_prob(z) - q.log_prob(z)


def hooked_loss(model, x, k, beta, m, terms, all_terms):
    """The DReG loss, thinned to m samples an example (m = 0: all k), as `--compile` trained it
    up to commit 2c33f6d: eager sampling and draw, DReG's hook on z, compiled terms."""
    if not m:
        return objectives.iwae(model, x, k, None, beta=beta, dreg=True, terms=terms).loss.mean()
    q = objectives.encode(model, x)
    eps = draw_noise(q, (k,))
    with torch.no_grad():
        log_px_z, log_ratio = all_terms(model, x, None, eps)
    log_w = log_px_z + beta * log_ratio
    w = torch.softmax(log_w, dim=0)
    picked, ht = objectives.horvitz_thompson_draw(w, m)
    z = from_noise(q, eps.gather(0, picked.unsqueeze(-1).expand(-1, -1, eps.shape[-1])))
    lp, lr = terms(model, x, None, z)
    objectives._dreg_reweight(z, w.gather(0, picked), beta)
    surrogate = -(ht * (lp + beta * lr)).sum(0)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return (-bound + (surrogate - surrogate.detach())).mean()


def variants(args) -> list[tuple[str, object]]:
    """(name, step function) for each variant asked for."""
    x = (torch.rand(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    row_args = paper_table.parser().parse_args(["--batch-size", str(args.batch_size), "--activation", "softplus",
                                                "--dreg", "--compile"])
    beta = torch.tensor(1.0)
    out = []
    wanted = []
    if args.log_q == "both":
        wanted.append(("log q by functional_call", 0, "functional_call"))
    if args.hooked:
        wanted += [(f"hooked, grad_samples {m}", m, "hooked") for m in args.grad_samples]
    wanted += [(f"grad_samples {m}" + (" (all k)" if m == 0 else "") + ("" if p == "fp32" else f", {p}"), m, p)
               for p in args.precision for m in args.grad_samples]
    for name, m, way in wanted:
        cfg = paper_table.row_config(args.row, row_args)
        cfg = cfg.replace(train={"k": args.k or cfg.train.k, "grad_samples": m}, model={"input_shape": [1, 28, 28]})
        model = build(cfg.model, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        tc = cfg.train
        if way in PRECISIONS:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=way == "bf16")
            fn = compiled_loss(model, x, None, tc, autocast)
            if fn is None:
                sys.exit("torch.compile failed here (see the warning above); this benchmark times compiled steps.")

            def loss(model=model, fn=fn, tc=tc, autocast=autocast):
                with autocast:  # as fit calls it: the loss under autocast, the backward pass outside
                    return fn(model, x, None, beta, tc).loss.mean()
        elif way == "hooked":
            terms = torch.compile(objectives.dreg_terms, dynamic=False)
            all_terms = torch.compile(hooked_terms, dynamic=False)
            loss = (lambda model=model, tc=tc, m=m, terms=terms, all_terms=all_terms:
                    hooked_loss(model, x, tc.k, beta, m, terms, all_terms))
        else:
            terms = torch.compile(functional_call_terms, dynamic=False)
            loss = (lambda model=model, terms=terms, tc=tc:
                    objectives.iwae(model, x, tc.k, None, beta=beta, dreg=True, terms=terms).loss.mean())

        def step(loss=loss, opt=opt):
            value = loss()
            opt.zero_grad()
            value.backward()
            opt.step()

        out.append((name, step))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="iwae-2l-k50", help="a row of bench/paper_table.py (an IWAE row)")
    ap.add_argument("--k", type=int, default=0, help="samples per image (0: the row's)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--grad-samples", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--log-q", choices=["fixed", "both"], default="fixed",
                    help="both: also time log q through functional_call, as before 2026-11-27")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                    help="time each --grad-samples value in each of these")
    ap.add_argument("--hooked", action="store_true",
                    help="also time each --grad-samples value the way --compile trained up to commit 2c33f6d")
    ap.add_argument("--blocks", type=int, default=8, help="blocks of 100 steps per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N steps of the last variant (torch.profiler) and list its operators")
    args = ap.parse_args(argv)
    if not paper_table.parse_row(args.row)[1] == "iwae":
        sys.exit(f"--row {args.row}: give an IWAE row (the DReG step is what this times).")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    with flush_denormals():
        runs = variants(args)
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        for _, step in runs:  # warm-up, after compiling
            for _ in range(30):
                step()
        for _ in range(args.blocks):
            for name, step in runs:
                t0 = time.perf_counter()
                for _ in range(100):
                    step()
                times[name].append((time.perf_counter() - t0) * 10)  # ms a step
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    runs[-1][1]()
    first = statistics.median(times[runs[0][0]])
    k = args.k or paper_table.parse_row(args.row)[2]
    print(f"{args.row}, k = {k}, batch {args.batch_size}, {args.threads} threads, {args.blocks} blocks of 100 steps")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:26s} {med:6.2f} ms a step (blocks {min(t):.2f} to {max(t):.2f})  x{first / med:.2f}")
    if args.profile:
        print(f"\n{runs[-1][0]}: {args.profile} steps under torch.profiler (slower than unprofiled), "
              "operators by their own time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
