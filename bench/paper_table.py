"""Reproduce Table 1 of Burda et al. 2015 (IWAE) on dynamically binarized MNIST, under an epoch budget.

    python bench/paper_table.py --rows vae-1l-k1 iwae-1l-k50 --epochs 200
    python bench/paper_table.py --rows all --epochs 100 --out runs/paper

Each row trains the paper's architecture (tanh; 784-200-200-50, or 784-200-200-100-100-100-50 for
two stochastic layers) with Adam and a cosine learning-rate schedule (our recipe; the paper used
3^i passes at 0.001·10^(−i/7), i = 0…7, i.e. 3280 passes at batch 20) on the paper's training set
(MNIST's 60k training images but the last 400, which are held out for validation; the code of
Burda et al., datasets.py, does the same), then evaluates the test NLL
with the paper's protocol: k = 5000 importance samples per image, all 10k test images, binarized
once with a fixed seed. Rows already finished are skipped; a row that stopped mid-training resumes
exactly from its last checkpoint. The table is printed beside the paper's numbers.

    python bench/paper_table.py --markdown --archive docs/paper_runs.json --out runs/paper --also runs/paper_59k

prints the table of finished recipes (--figure FILE draws their NLL against epochs); recipes whose
directories are gone are read from the archive, which --archive-update fills from finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vaekit import runs
from vaekit.config import RunConfig, merge, preset
from vaekit.data import load_data
from vaekit.evaluate import PRECISIONS, evaluate
from vaekit.models import build
from vaekit.models.common import ACTIVATIONS
from vaekit.train import eval_set, fit, selection_score

# (layers, objective, k) -> the paper's test NLL in nats (Table 1).
PAPER = {
    (1, "vae", 1): 86.76, (1, "vae", 5): 86.47, (1, "vae", 50): 86.35,
    (1, "iwae", 1): 86.76, (1, "iwae", 5): 85.54, (1, "iwae", 50): 84.78,
    (2, "vae", 1): 85.33, (2, "vae", 5): 85.01, (2, "vae", 50): 84.78,
    (2, "iwae", 1): 85.33, (2, "iwae", 5): 83.89, (2, "iwae", 50): 82.90,
}
# With k = 1 the IWAE is the VAE: those two rows are one run, named vae-*-k1.
ROWS = [f"{obj}-{layers}l-k{k}" for (layers, obj, k) in PAPER if obj == "vae" or k > 1]
CURVE_EPOCHS = {1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500}


def parse_row(name: str) -> tuple[int, str, int]:
    obj, layers, k = name.split("-")
    return int(layers[0]), obj, int(k[1:])


def row_config(name: str, args) -> RunConfig:
    """The paper's architecture and protocol for one row, with our training recipe from ``args``."""
    layers, obj, k = parse_row(name)
    base = merge(RunConfig().to_dict(), preset("iwae-1l" if layers == 1 else "iwae-2l"))
    # "VAE, k samples" is the ELBO with its reconstruction term averaged over k draws.
    # DReG with one sample is "sticking the landing" (Roeder et al. 2017): the k = 1 IWAE objective is
    # the ELBO (with its KL sampled, not in closed form), and the encoder's gradient drops the score term.
    objective = "iwae" if (obj == "iwae" and k > 1) or (args.dreg and k == 1) else "elbo"
    dreg = args.dreg and objective == "iwae"
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": "cosine",
             "lr_min": args.lr * args.lr_min_factor, "objective": objective, "k": k, "warmup_steps": args.warmup,
             "dreg": dreg, "adam_eps": args.adam_eps, "output_bias": args.output_bias,
             "seed": args.seed, "compile": args.compile, "ema": args.ema, "precision": args.train_precision,
             "grad_samples": args.grad_samples if dreg else 0}
    if args.k_start and objective == "iwae" and k > args.k_start[0]:
        train |= {"k_start": args.k_start[0], "k_start_epochs": args.k_start[1],
                  "k_start_batch_size": args.k_start_batch}
    model = {} if args.activation is None else {"activation": args.activation}
    data = {"mnist_valid": args.mnist_valid}
    return RunConfig.from_dict(merge(base, {"model": model, "data": data, "train": train, "preset": f"paper-{name}"}))


def curve_point(model, x_curve: torch.Tensor, epoch: int, k: int) -> dict:
    ev = evaluate(model, x_curve, k=k, seed=0, progress=False)
    return {"epoch": epoch, "nll": ev["nll"], "nll_stderr": ev["nll_stderr"], "nelbo": ev["nelbo"],
            "active_units": ev["active_units"], "n_images": len(x_curve), "k": k}


def run_row(name: str, out: Path, args, splits) -> dict:
    run = out / name
    result_path = run / "paper_result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    cfg = row_config(name, args)
    cfg = cfg.replace(model={"input_shape": list(splits.train.shape)})
    resume = (run / "state.safetensors").exists()
    if resume and runs.load_config(run) != cfg:
        sys.exit(f"{run} holds a run with another config; move it away or pick another --out.")
    if not resume:
        run.mkdir(parents=True, exist_ok=True)
        runs.save_config(run, cfg)
    model = build(cfg.model, seed=cfg.train.seed)
    x_test = eval_set(splits.test, cfg.data)
    x_curve = x_test[: args.curve_images]
    curve_path = run / "curve.jsonl"

    def on_epoch(r: dict) -> None:
        line = f"   epoch {r['epoch']:>4}  train loss {r['train_loss']:.2f}  valid -ELBO {r['valid_nelbo']:.2f}"
        if "valid_iwae_loss" in r:
            line += f"  valid -L_{cfg.train.k} {r['valid_iwae_loss']:.2f}"
        if r["epoch"] in args.curve_epochs or r["epoch"] == cfg.train.epochs:
            # The test NLL of this epoch's weights as fit saved them (with --ema, their moving average),
            # on the first --curve-images test images.
            point = curve_point(runs.load(run, "last"), x_curve, r["epoch"], args.k)
            kept = [c for c in runs.read_jsonl(curve_path) if c["epoch"] < r["epoch"]] if curve_path.exists() else []
            runs.write_jsonl(curve_path, [*kept, point])
            line += f"  test NLL ({len(x_curve)} images) {point['nll']:.2f}"
        print(line + f"  {r['seconds']:.1f}s", flush=True)

    t0 = time.perf_counter()
    print(f"== {name}: training {cfg.train.epochs} epochs" + (" (resuming)" if resume else ""), flush=True)
    metrics = fit(model, cfg, splits, run, resume=resume, progress=args.progress, on_epoch=on_epoch)
    train_seconds = sum(m["seconds"] for m in metrics)
    t1 = time.perf_counter()
    best = runs.load(run)  # the best epoch by the validation objective
    ev = evaluate(best, x_test, k=args.k, precision=args.precision, seed=0, progress=args.progress)
    tc = cfg.train
    result = {
        "row": name, "epochs": len(metrics), "best_epoch": min(metrics, key=selection_score)["epoch"],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1), "nll": ev["nll"], "nll_stderr": ev["nll_stderr"],
        "nelbo": ev["nelbo"], "active_units": ev["active_units"], "k_eval": args.k, "precision": args.precision,
        "recipe": {"batch_size": tc.batch_size, "lr": tc.lr, "lr_min": tc.lr_min, "schedule": tc.lr_schedule,
                   "warmup_steps": tc.warmup_steps, "objective": tc.objective, "k": tc.k, "dreg": tc.dreg,
                   "k_start": tc.k_start, "k_start_epochs": tc.k_start_epochs,
                   "k_start_batch_size": tc.k_start_batch_size,
                   "adam_eps": tc.adam_eps, "output_bias": tc.output_bias, "seed": tc.seed,
                   "compile": tc.compile, "ema": tc.ema, "grad_samples": tc.grad_samples,
                   "train_precision": tc.precision,
                   "activation": cfg.model.activation,
                   "train_images": len(splits.train)},
        "threads": torch.get_num_threads(), "session_seconds": round(time.perf_counter() - t0, 1),
    }
    runs.write_json(result_path, result)
    return result


def recipe_rows(out: Path, archive: dict | None = None) -> dict[str, dict]:
    """Each row of the recipe in ``out``: {row: {"result": paper_result.json or None, "curve": [points]}}.

    From the directory when it holds any row; otherwise, from ``archive`` (the contents of a file such as
    docs/paper_runs.json, keyed "row (recipe)"), the rows stored there under the directory's name.
    """
    found = {}
    for run in sorted(p for p in out.glob("*") if p.name in ROWS):
        result, curve = run / "paper_result.json", run / "curve.jsonl"
        if result.exists() or curve.exists():
            found[run.name] = {"result": json.loads(result.read_text()) if result.exists() else None,
                               "curve": runs.read_jsonl(curve) if curve.exists() else []}
    if found or archive is None:
        return found
    tag = f" ({out.name})"
    return {key[: -len(tag)]: entry for key, entry in archive.items() if key.endswith(tag)}


def read_archive(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.exists():
        sys.exit(f"{path}: no such archive; give the file that --archive-update wrote (docs/paper_runs.json).")
    return json.loads(path.read_text())


def update_archive(path: Path, outs: list[Path]) -> None:
    """Store the rows found in the ``outs`` directories into the archive at ``path`` (replacing same-named ones)."""
    archive = json.loads(path.read_text()) if path.exists() else {}
    added = {f"{row} ({out.name})": entry for out in outs for row, entry in recipe_rows(out).items()}
    if not added:
        sys.exit(f"no rows with a result or a curve under {', '.join(map(str, outs))}; nothing stored.")
    runs.write_text(path, runs.dumps(archive | added, indent=1) + "\n")
    print(f"stored {len(added)} rows in {path}: {', '.join(added)}")


def markdown(rows: dict[str, dict], tag: str = "") -> str:
    """The table of the finished ``rows`` (as recipe_rows gives them) in Markdown, beside the paper's numbers."""
    lines = ["| row | training images | epochs (best) | NLL, ours | paper | gap | −ELBO | active units | train s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted((n for n in rows if rows[n]["result"]), key=ROWS.index):
        r = rows[name]["result"]
        paper = PAPER[parse_row(r["row"])]
        n_train = r["recipe"].get("train_images", 50_000)  # rows from before 2026-11-25 all trained on 50k
        lines.append(f"| {r['row']}{tag} | {n_train:,} | {r['epochs']} ({r['best_epoch']}) | "
                     f"{r['nll']:.2f} ± {r['nll_stderr']:.2f} | "
                     f"{paper:.2f} | {r['nll'] - paper:+.2f} | {r['nelbo']:.2f} | {r['active_units']} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def figure(recipes: list[tuple[str, dict[str, dict]]], path: Path) -> None:
    """Test NLL against epochs for every row of the ``recipes`` (name, recipe_rows) with a curve, beside the paper.

    A row keeps its colour in every recipe; each recipe has its own line style,
    and rows from the second and later recipes are labelled with the recipe's name.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # above: the whole of each curve; below: from epoch 50 on, where the rows near their targets
    fig, (ax, zoom) = plt.subplots(2, 1, figsize=(10, 8.6), height_ratios=(1, 0.9))
    curves = [(name, rows[name]["curve"], j) for j, (_, rows) in enumerate(recipes)
              for name in sorted(rows, key=ROWS.index) if rows[name]["curve"]]
    styles = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (4, 1)), (0, (6, 2, 1, 2, 1, 2)),
              (0, (2, 2, 6, 2)), (0, (9, 2)), (0, (3, 1, 3, 1, 1, 1)), (0, (8, 1, 1, 1))]
    markers = ["o", "s", "^", "D"]  # with the line style, one (style, marker) pair per recipe
    for name, pts, j in curves:
        color = f"C{ROWS.index(name) % 10}"
        label = name if j == 0 else f"{name} ({recipes[j][0]})"
        for axes in (ax, zoom):
            axes.plot([p["epoch"] for p in pts], [p["nll"] for p in pts], ls=styles[j % len(styles)],
                      marker=markers[j // len(styles) % len(markers)], color=color, label=label, ms=3)
            axes.axhline(PAPER[parse_row(name)], color=color, ls=":", lw=1)
    last = max((p["epoch"] for _, pts, _ in curves for p in pts), default=100)
    for axes in (ax, zoom):
        axes.set_xscale("log")
        axes.set_xlabel("epoch (passes over the training images)")
        axes.set_ylabel("test NLL, nats (k = 5000, first 1000 test images)")
        axes.grid(alpha=0.3, which="both")
    ax.set_ylim(min(PAPER.values()) - 2, 125)  # the first epochs sit far above; the end is what matters
    zoom.set_xlim(50, max(last * 1.1, 60))
    zoom.set_xticks([t for t in (50, 75, 100, 150, 200, 300, 400, 500, 700, 1000) if t <= max(last * 1.1, 60)])
    zoom.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    zoom.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    zoom.set_ylim(min(PAPER.values()) - 2, 90)
    ax.set_title("Test NLL against epochs; dotted: Burda et al. 2015 after 3280 epochs", fontsize=10)
    zoom.set_title("From epoch 50 on (the first 1000 test images score 0.6 to 1.4 nats below all 10k)",
                   fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: the curves' ends stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    ap.add_argument("--rows", nargs="+", default=["vae-1l-k1"], help=f"'all' or any of: {', '.join(ROWS)}")
    ap.add_argument("--epochs", type=int, default=200, help="passes over the training set per row")
    ap.add_argument("--batch-size", type=int, default=100, help="images per step (the paper: 20)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate at the start")
    ap.add_argument("--lr-min-factor", type=float, default=0.01, help="cosine schedule ends at lr times this")
    ap.add_argument("--warmup", type=int, default=0, help="KL warm-up steps (0: none); for the IWAE rows β weights log p(z) − log q(z|x) in each weight")
    ap.add_argument("--dreg", action="store_true",
                    help="IWAE rows: the doubly reparameterized encoder gradient (Tucker et al. 2019); same "
                         "objective, less noisy gradient. The k = 1 rows then train with its one-sample case, "
                         "'sticking the landing' (Roeder et al. 2017); the VAE rows with k > 1 are unchanged")
    ap.add_argument("--grad-samples", type=int, default=0, metavar="N",
                    help="with --dreg, IWAE rows: backpropagate through N of the k samples per image, drawn "
                         "by their importance weight and reweighted so that the gradient stays unbiased (0: all)")
    ap.add_argument("--k-start", type=int, nargs=2, metavar=("K", "EPOCHS"), default=None,
                    help="IWAE rows with more than K samples: train the first EPOCHS epochs with K samples, "
                         "then with the row's k (early epochs cost less; validation and the test use the row's k)")
    ap.add_argument("--k-start-batch", type=int, default=0, metavar="B",
                    help="with --k-start: the batch size of those first epochs (0: --batch-size throughout). The "
                         "lr schedule and --warmup count steps of --batch-size images, so a phase at another batch "
                         "size moves them as far per epoch")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep a moving average of the weights with this decay (e.g. 0.9995) and validate, keep "
                         "and test it instead of the raw weights (0: off)")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed: the initial weights, the data order, the binarization and the samples")
    ap.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's ε (the paper: 1e-4; torch's default 1e-8)")
    ap.add_argument("--output-bias", default="zero", choices=["zero", "data"],
                    help="the decoder's output bias at the start: zero, or the logit of the mean training image "
                         "(as in the paper's code)")
    ap.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                    help="hidden units (default: the paper's tanh); the layer sizes stay the paper's")
    ap.add_argument("--mnist-valid", type=int, default=400,
                    help="of MNIST's 60k training images, how many (the last) to hold out for validation; the rest "
                         "train (the paper: 400; 10000 gives the usual 50k/10k split)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true",
                    help="train with torch.compile (vaekit train --compile): the same numbers up to float rounding")
    ap.add_argument("--curve-images", type=int, default=1000,
                    help="test images for the NLL-vs-epoch curve")
    ap.add_argument("--curve-epochs", type=int, nargs="*", default=sorted(CURVE_EPOCHS), metavar="E",
                    help="the epochs at which the curve is measured (the last one always is); a point on 1000 "
                         "images costs about a tenth of the final evaluation (default: %(default)s)")
    ap.add_argument("--figure", type=Path, default=None,
                    help="only draw the NLL-vs-epoch figure of the rows under --out into this file")
    ap.add_argument("--markdown", action="store_true", help="only print the finished rows under --out as Markdown")
    ap.add_argument("--also", type=Path, nargs="*", default=[],
                    help="with --figure/--markdown: further output directories (other recipes) to include")
    ap.add_argument("--archive", type=Path, default=None, metavar="FILE",
                    help="with --figure/--markdown: a recipe whose directory holds no rows is read from this file "
                         "(rows and curves stored by --archive-update, e.g. docs/paper_runs.json)")
    ap.add_argument("--archive-update", action="store_true",
                    help="only store the rows under --out and --also (results and curves) into --archive FILE")
    ap.add_argument("--k", type=int, default=5000, help="importance samples for the test NLL (paper: 5000)")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS, help="of the test NLL's evaluation")
    ap.add_argument("--train-precision", default="fp32", choices=PRECISIONS,
                    help="of training (bf16: matmuls under autocast, fp32 weights; vaekit train --precision)")
    ap.add_argument("--out", type=Path, default=Path("runs/paper"))
    ap.add_argument("--progress", action="store_true")
    return ap


class _Help(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default where it has one and its help does not name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is d for d in (None, False, argparse.SUPPRESS)) and action.default != [] \
                and "default" not in text:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {default})"
        return text


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.k_start_batch and not args.k_start:
        sys.exit("--k-start-batch is the batch size of the --k-start epochs; give --k-start K EPOCHS too, or drop it.")
    if args.grad_samples and not args.dreg:
        sys.exit("--grad-samples thins the backward pass of the DReG estimator; give --dreg too, or drop it.")
    if args.archive_update:
        if args.archive is None:
            sys.exit("--archive-update stores rows into the --archive FILE; give --archive too.")
        return update_archive(args.archive, [args.out, *args.also])
    if args.figure is not None or args.markdown:
        archive = read_archive(args.archive)
        recipes = [(out.name, recipe_rows(out, archive)) for out in [args.out, *args.also]]
        empty = [name for name, rows in recipes if not rows]
        if empty:
            where = f" nor in {args.archive}." if archive is not None else " (read an archive with --archive FILE)."
            sys.exit(f"no rows for the recipes {', '.join(empty)}: neither in their directories" + where)
    if args.figure is not None:
        return figure(recipes, args.figure)
    if args.markdown:
        tables = [markdown(recipes[0][1])] + ["\n".join(markdown(rows, f" ({name})").splitlines()[2:])
                                            for name, rows in recipes[1:]]
        return print("\n".join(tables))
    rows = ROWS if args.rows == ["all"] else args.rows
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {ROWS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_data("mnist", mnist_valid=args.mnist_valid)
    results = [run_row(r, args.out, args, splits) for r in rows]
    print(f"\n{'row':<14}{'epochs':>7}{'NLL (ours)':>14}{'paper':>8}{'gap':>8}{'train s':>9}{'eval s':>8}")
    for r in results:
        paper = PAPER[parse_row(r["row"])]
        print(f"{r['row']:<14}{r['epochs']:>7}{r['nll']:>9.2f} ±{r['nll_stderr']:.2f}{paper:>8.2f}"
              f"{r['nll'] - paper:>+8.2f}{r['train_seconds']:>9.0f}{r['eval_seconds']:>8.0f}")
    print(f"\nNLL: test-set mean of -log p(x), importance sampling with q(z|x), k = {args.k}, "
          f"10k test images binarized once (seed 0); gap > 0 means short of the paper.")


if __name__ == "__main__":
    main()
