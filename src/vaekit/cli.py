"""The `vaekit` command: parse, call the library, write files.

Exit codes: 0 success, 2 bad input or usage (a message, no traceback unless
--debug), 1 internal error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, List, Optional, get_args

import torch
import typer

from vaekit import __version__, runs
from vaekit.config import (MAX_SEED, PRESET_SOURCES, PRESETS, Activation, ModelConfig, RunConfig, TrainConfig, merge,
                           preset)
from vaekit.errors import ConfigError, DataError, RunError, VaekitError

_TRAIN = TrainConfig()  # the defaults --help names

app = typer.Typer(
    help="Variational autoencoders: train, sample, reconstruct, encode, interpolate, evaluate log p(x), plot "
    "and compare.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch, import and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


MAX_THREADS = 4096


def _set_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {threads} (this machine has "
                          f"{os.cpu_count()} CPUs).")
    torch.set_num_threads(threads)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got '{name}'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device torch can use; use --device cpu "
                          "(or auto, which picks CUDA when there is one).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return device


def _absolute(source: Optional[str]) -> Optional[str]:
    """A --data path as an absolute path, so that the run finds its data from any folder; names kept."""
    if source is None or source == "mnist" or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def _progress(flag: Optional[bool]) -> bool:
    """--progress/--no-progress, or when neither is given: bars only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def _check_count(n: int, most: int, what: str) -> None:
    if not 1 <= n <= most:
        raise ConfigError(f"--n must be between 1 and {most}; got {n}. ({most} is the most {what}.)")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED} (torch's range); got {seed}.")


MAX_EVAL_K = 1_000_000  # eval --k: beyond this a test set takes days
ENCODE_PART = 10_000  # `encode` reads a streamed split this many examples at a time


def _parse_hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",")]
    except ValueError:  # a word, or an empty part as in '256,,128' or '512,'
        sizes = []
    if not sizes:
        raise ConfigError(f"--hidden takes comma-separated layer sizes like 512,256; got '{text}'.")
    return sizes


_SECTIONS = {key for key, value in RunConfig().to_dict().items() if isinstance(value, dict)}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set model.latent_dim=2 --set train.lr=3e-4 -> nested dict (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set takes section.key=value, e.g. model.latent_dim=2; got '{item}'.")
        key, raw = item.split("=", 1)
        if key in _SECTIONS:
            raise ConfigError(f"--set takes section.key=value, e.g. model.latent_dim=2; got '{item}', "
                              f"which would replace the whole {key} section.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parents[:i + 1])} was set to a value before, "
                                  "so it has no keys; set each key once.")
        node[leaf] = value
    return out


def _extended(run: Path, cfg: RunConfig, epochs: int) -> RunConfig:
    """The run's config with a new epoch budget, for --resume --epochs N (fit rewrites config.json once the
    checkpoint and the data have passed its checks)."""
    done = len(runs.read_jsonl(run / "metrics.jsonl")) if (run / "metrics.jsonl").is_file() else 0
    if epochs < max(done, 1):
        raise ConfigError(f"{run} has trained {done} epochs already; --epochs must be at least that to resume it.")
    if cfg.train.lr_schedule != "constant":
        raise ConfigError(f"{run} follows a {cfg.train.lr_schedule} learning-rate schedule laid over "
                          f"{cfg.train.epochs} epochs; changing the budget would change that schedule mid-run. "
                          "Resume it without --epochs, or start a new run.")
    return cfg.replace(train={"epochs": epochs})


def _prepare_out(out: Path, resume: bool) -> None:
    """Fail before any training if --out cannot hold a run. Creates nothing: the run
    directory is made only once the data has loaded and passed its checks."""
    if resume:
        runs.check_run_dir(out)
    else:
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file; give a directory for the run.")
        if out.is_dir() and any(out.iterdir()):
            raise RunError(f"--out {out} already holds files; pick a new directory, or continue the run in it "
                           f"with `vaekit train --out {out} --resume`.")
        parent = out
        while not parent.exists():  # the directory the run would be created in
            parent = parent.parent
        if not parent.is_dir():
            raise RunError(f"cannot create --out {out}: {parent} is a file, not a directory. "
                           "Choose an --out inside a directory.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunError(f"cannot write to --out {out}: {parent} is not writable. Choose a writable directory.")
    if hasattr(os, "statvfs"):
        st = os.statvfs(out if out.exists() else parent)
        free = st.f_bavail * st.f_frsize
        if free < 50 * 2**20:
            raise RunError(f"only {free / 2**20:.1f} MiB free on the disk that holds --out {out}; a run needs "
                           "at least 50 MiB for checkpoints and figures. Free some space"
                           + ("." if resume else " or choose another --out."))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the folder {folder}: {e.strerror}.") from None


@contextlib.contextmanager
def _writable(folder: Path):
    """An output that cannot be written (a folder one may not write to, a full disk) is a clear error.
    Not for training's own files: fit explains those, with how to resume."""
    try:
        yield
    except OSError as e:
        raise RunError(f"cannot write into {folder}: {e.strerror}. Choose a folder you can write to, "
                       "or free some space.") from None


def _save_figures(run: Path, figs: dict) -> None:
    _make_folder(run)
    with _writable(run):
        for name, fig in figs.items():
            runs.atomic_write(run / name, lambda p, fig=fig: fig.savefig(p, dpi=110, bbox_inches="tight",
                                                                         format="png"))


_OVERWRITE = typer.Option(False, "--overwrite", help="Replace the file --out names if it exists (the "
                          "default output in the run is always replaced).")


def _out_file(out: Optional[Path], suffix: str, run: Path, *, data: Optional[Path] = None,
              overwrite: bool = False, option: str = "--out") -> Optional[Path]:
    """A command's --out file, checked before any work (None: the command's default); its folder is made
    when the file is written. It never changes the data (_not_the_input), and a file the user named is
    not replaced unless they say so."""
    if out is None:
        return None
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"{option} {out} is a folder; give a file name ending in {suffix}.")
    if out.suffix.lower() != suffix:
        raise ConfigError(f"{option} must name a {suffix} file; got '{out}'.")
    _not_the_input(out, data, run)
    if os.path.lexists(out) and not overwrite:  # lexists: a dangling link is a name the user has used too
        raise ConfigError(f"{option} {out} already exists; name a new file, or pass --overwrite to replace it.")
    return out


def finish_run(run: Path, *, progress: bool = True) -> dict:
    """After training: test ELBO of the best weights, figures, summary.json and report.html."""
    from vaekit import figures
    from vaekit.train import elbo_means, eval_set, labels_for, selection_score

    cfg = runs.load_config(run)
    model = runs.load(run)
    splits = _run_splits(run, cfg)
    _same_shape(run, cfg, splits.train)
    split, ds = ("test", splits.test) if splits.test is not None else ("valid", splits.valid)
    x = eval_set(ds, cfg.data)
    metrics = runs.read_jsonl(run / "metrics.jsonl")
    ev = elbo_means(model, x, cfg.train.eval_batch_size, seed=cfg.train.seed, y=labels_for(ds, cfg.model))
    old = runs.read_json(run / "summary.json", default={})
    best = min(metrics, key=selection_score)["epoch"] if metrics else None
    if old.get("best_epoch") != best:  # other weights now: `vaekit eval`'s results were of the old ones
        old = {key: value for key, value in old.items() if not key.endswith("_eval")}
    summary = {
        **old,
        "latent_dim": cfg.model.latent_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": len(metrics),
        "best_epoch": best,
        "train_seconds": round(sum(m["seconds"] for m in metrics), 2),
        split: {"elbo": -ev["nelbo"], **ev, "n_images": len(x), "labelled": ds.y is not None,
                "display_range": figures.display_range(x),
                "binarization": cfg.data.binarize,
                "binarize_seed": cfg.data.binarize_seed, "estimator": "ELBO, 1 sample of z per image"},
    }
    with _writable(run):
        runs.write_json(run / "summary.json", summary)
    _save_figures(run, figures.run_figures(model, x, ds.y, metrics, class_names=ds.classes,
                                           train_is_elbo=cfg.train.objective != "norm-penalty"))
    with _writable(run):
        write_report(run)
    return summary


def write_report(run: Path) -> None:
    """report.html from what the run directory holds now: config, summary, metrics, figures."""
    from vaekit import figures, report

    summary = runs.read_json(run / "summary.json", default={})
    cfg = runs.load_config(run)
    split = "test" if "test" in summary else "valid"
    about = summary.get(split, {})
    captions = figures.captions(cfg.model, split, about.get("n_images"), labelled=about.get("labelled", True),
                                value_range=about.get("display_range"))
    figs = [(captions[name], name) for name in figures.NAMES if (run / name).exists()]
    html = report.run_report(f"vaekit run: {run.name}", cfg.to_dict(), summary, figs,
                             runs.read_jsonl(run / "metrics.jsonl"))
    runs.write_text(run / "report.html", html)


# ----------------------------------------------------------------------------- train
@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory to create (or to continue with --resume)."),
    preset_name: Optional[str] = typer.Option(None, "--preset", help=f"Start from a preset: {', '.join(PRESETS)}."),
    data: Optional[str] = typer.Option(None, "--data", help="'mnist' or a path: .npz/.npy, image folder, IDX file."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", help="Size of z."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="Encoder layer sizes, e.g. 512,256 (decoder mirrors)."),
    activation: Optional[str] = typer.Option(None, "--activation", help=", ".join(get_args(Activation)) + "."),
    likelihood: Optional[str] = typer.Option(None, "--likelihood", help="bernoulli or gaussian."),
    sigma: Optional[str] = typer.Option(None, "--sigma", help="Gaussian σ (a number), or 'learned'."),
    binarize: Optional[str] = typer.Option(None, "--binarize", help="dynamic, static or none (default: dynamic for "
                                           "MNIST with a Bernoulli likelihood, else none)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Passes over the training set (default {_TRAIN.epochs})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Images per step (default {_TRAIN.batch_size})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Adam's learning rate (default {_TRAIN.lr:g})."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight of the rate term: the KL (β-VAE; 1, the default, "
                                         "is the ELBO), or λ of --objective norm-penalty. Not with iwae."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seeds the weights, batches, noise and binarization "
                                       f"(default {_TRAIN.seed})."),
    subset: Optional[int] = typer.Option(None, "--subset", help="Use only the first N training images."),
    stream: Optional[str] = typer.Option(None, "--stream", help="auto, yes or no: read a .npy file's training "
                                         "batches from disk as they are needed (auto: when the file is larger than "
                                         "half the free memory)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or bf16 (autocast, fp32 weights). "
                                            "bf16 is faster only where the CPU multiplies bf16 fast (an AMD Zen 4: "
                                            "yes; an Intel Xeon without AMX: no; docs/results.md)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="elbo, iwae (with --k) or norm-penalty "
                                            "(the poor man's VAE)."),
    k: Optional[int] = typer.Option(None, "--k", help="Samples of z per image: the bound's k for --objective "
                                    "iwae; for elbo, the reconstruction term is averaged over k samples."),
    dreg: bool = typer.Option(False, "--dreg", help="With --objective iwae: the doubly reparameterized encoder "
                              "gradient (Tucker et al. 2019); same objective, less noisy gradient."),
    grad_samples: Optional[int] = typer.Option(None, "--grad-samples", help="With --dreg: backpropagate through "
                                               "N of the k samples per image, drawn by their importance "
                                               "weight and reweighted: an unbiased gradient, a cheaper backward pass."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="KL warm-up: β rises linearly over N steps."),
    free_bits: Optional[float] = typer.Option(None, "--free-bits", help="Floor (nats) on each latent dim's KL."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant or cosine."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the loss (inductor; the first "
                                  "steps take longer). Falls back to eager with a message where it fails."),
    conditional: bool = typer.Option(False, "--conditional", help="A conditional VAE: encoder and decoder "
                                     "given the label (classes counted from the data's labels)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config.json to start from, e.g. another run's "
                                               "(flags and --set override it)."),
    set_: List[str] = typer.Option([], "--set", help="Any config field: --set model.activation=tanh."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N "
                                                   "steps, not only after each epoch (for runs that may be killed)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's "
                                          "choice, the physical cores)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", show_default=False,
                                            help="Show progress bars (default: when stderr is a terminal)."),
) -> None:
    """Train a VAE and write a run directory with weights, metrics, figures and a report."""
    _set_threads(threads)
    progress = _progress(progress)
    dev = _device(device)
    from vaekit.data import check_unit_range, load_splits
    from vaekit.models import build
    from vaekit.train import fit, labels_for

    if resume:
        given = [flag for flag, value in [
            ("--preset", preset_name), ("--data", data), ("--latent-dim", latent_dim), ("--hidden", hidden),
            ("--activation", activation), ("--likelihood", likelihood), ("--sigma", sigma), ("--binarize", binarize), ("--stream", stream),
            ("--batch-size", batch_size), ("--lr", lr), ("--beta", beta), ("--seed", seed),
            ("--subset", subset), ("--precision", precision), ("--config", config_file), ("--set", set_ or None),
            ("--checkpoint-every", checkpoint_every), ("--objective", objective), ("--k", k), ("--dreg", dreg or None),
            ("--grad-samples", grad_samples), ("--warmup", warmup),
            ("--free-bits", free_bits), ("--lr-schedule", lr_schedule),
            ("--conditional", conditional or None), ("--compile", compile_ or None)] if value is not None]
        if given:
            raise ConfigError(f"--resume continues the run with its saved {out / 'config.json'}, so "
                              f"{', '.join(given)} would be ignored; drop them (or edit config.json).")
        cfg = runs.load_config(out)
        runs.read_json(out / "summary.json", default={})  # damaged: say so now, not after an epoch's training
        if epochs is not None and epochs != cfg.train.epochs:
            cfg = _extended(out, cfg, epochs)
    else:
        base: dict[str, Any] = RunConfig().to_dict()
        given_binarize = None  # as --config gives it (a run's own config.json always does)
        if config_file is not None:
            if not config_file.is_file():
                raise ConfigError(f"--config {config_file} " + ("is a folder; give the config.json in it."
                                  if config_file.is_dir() else "does not exist."))
            try:
                given = json.loads(config_file.read_text(encoding="utf-8"))
            except ValueError as e:  # not JSON, or not UTF-8 text
                raise ConfigError(f"--config {config_file} is not valid JSON ({e}).") from None
            if not isinstance(given, dict):
                raise ConfigError(f"--config {config_file} must hold a JSON object of config sections.")
            given.pop("vaekit_version", None)  # a run's own config.json is a fine start for a new run
            section = given.get("data")
            given_binarize = section.get("binarize") if isinstance(section, dict) else None
            base = merge(base, RunConfig.from_dict(given).to_dict())
        if preset_name:
            base = merge(base, {**preset(preset_name), "preset": preset_name})
        flags = {
            "model": {"latent_dim": latent_dim, "activation": activation, "likelihood": likelihood,
                      "hidden": None if hidden is None else _parse_hidden(hidden)},
            "data": {"source": data, "binarize": binarize, "subset": subset, "stream": stream},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "beta": beta, "seed": seed,
                      "precision": precision, "checkpoint_every": checkpoint_every, "objective": objective,
                      "k": k, "warmup_steps": warmup, "free_bits": free_bits, "lr_schedule": lr_schedule,
                      "compile": compile_ or None, "dreg": dreg or None, "grad_samples": grad_samples},
        }
        if sigma is not None:
            if sigma == "learned":
                flags["model"]["learn_sigma"] = True
            else:
                try:
                    flags["model"]["sigma"] = float(sigma)
                except ValueError:
                    raise ConfigError(f"--sigma takes a number or 'learned'; got '{sigma}'.") from None
        flags = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
        overrides = _parse_set(set_)
        merged = merge(merge(base, flags), overrides)
        chosen = binarize or overrides.get("data", {}).get("binarize") or given_binarize or \
            (preset_name and preset(preset_name).get("data", {}).get("binarize"))
        if not chosen:
            merged["data"]["binarize"] = None  # RunConfig fills in the default for the data and decoder
        cfg = RunConfig.from_dict(merged)
        if sigma is not None and cfg.model.likelihood != "gaussian":
            raise ConfigError(f"--sigma {sigma} is the σ of a Gaussian decoder, and this run's is "
                              f"{cfg.model.likelihood}; add --likelihood gaussian, or drop --sigma.")
        if _absolute(cfg.data.source) != cfg.data.source:  # from --data, --set or --config alike
            cfg = cfg.replace(data={"source": _absolute(cfg.data.source)})
        # A preset's class count (cvae: 10) is MNIST's; other labelled data has its classes counted.
        preset_classes = bool(preset_name and preset(preset_name).get("model", {}).get("n_classes"))
        if preset_classes and cfg.data.source != "mnist" and "n_classes" not in overrides.get("model", {}):
            conditional, cfg = True, cfg.replace(model={"n_classes": 0})
    _prepare_out(out, resume)
    _outside(out, _source_path(cfg.data.source), "the training data")

    # Load and check the data before writing anything, so bad data leaves no run behind.
    splits = _run_splits(out, cfg) if resume else load_splits(cfg.data)
    if splits.train.streamed:
        typer.echo(f"{splits.train.source}: training batches are read from disk as they are needed "
                   f"({splits.train.source.stat().st_size / 2**30:.1f} GiB; --stream {cfg.data.stream}); "
                   "the validation split is in memory.", err=True)
    if cfg.model.likelihood == "bernoulli":
        for ds in (splits.train, splits.valid, splits.test):
            if ds is not None:
                check_unit_range(ds)
    if resume:
        _same_shape(out, cfg, splits.train)
    if cfg.train.batch_size > len(splits.train):
        if resume:
            raise DataError(f"{out} trains in batches of {cfg.train.batch_size}, and its data {cfg.data.source} "
                            f"now has only {len(splits.train)} training examples: the data has changed since "
                            "the run began. Put the run's data back, or train a new run on this data.")
        raise ConfigError(f"--batch-size {cfg.train.batch_size} is larger than the {len(splits.train)} training "
                          f"examples; give --batch-size {len(splits.train)} or less.")
    cfg = cfg.replace(model={"input_shape": list(splits.train.shape)})
    if conditional and not cfg.model.n_classes:
        if splits.train.y is None:
            raise DataError(f"--conditional needs labels, and {cfg.data.source} has none (an .npz needs a 'y' "
                            "array; an image folder, one subfolder per class).")
        named = splits.train.classes  # an image folder: every subfolder is a class, even one --subset leaves out
        labelled = [ds.y for ds in (splits.train, splits.valid, splits.test) if ds is not None and ds.y is not None]
        count = len(named) if named else max(int(y.max()) for y in labelled) + 1
        if not named:
            seen = set(torch.cat([torch.unique(y) for y in labelled]).tolist())
            if len(seen) < count:  # (the labels may run up to 10**9: only the first few missing ones are listed)
                several = len(seen) < count - 1
                unseen = list(itertools.islice((i for i in range(count) if i not in seen), 5))
                raise DataError(f"{cfg.data.source}: labels run up to {count - 1}, so a conditional model would take "
                                f"{count} classes, but {count - len(seen)} of those labels "
                                f"{'never occur' if several else 'never occurs'} (e.g. {', '.join(map(str, unseen))}) "
                                "and would stay untrained. Number the labels 0..C-1 "
                                "(y = numpy.unique(y, return_inverse=True)[1]).")
        untrained = sorted(set(range(count)) - set(torch.unique(splits.train.y).tolist()))
        if untrained:
            typer.echo(f"note: no training example has label {', '.join(map(str, untrained[:5]))}"
                       f"{' …' if len(untrained) > 5 else ''} (the split or --subset left it out); the model "
                       "learns nothing for it.", err=True)
        cfg = cfg.replace(model={"n_classes": max(2, count)})
    for ds in (splits.train, splits.valid):
        labels_for(ds, cfg.model)  # a conditional model: labels present and in range, before anything is written
    if cfg.model.n_classes and splits.train.classes and not resume:
        cfg = cfg.replace(model={"class_names": list(splits.train.classes)})  # `sample --label` takes them
    model = build(cfg.model, seed=cfg.train.seed).to(dev)
    has_checkpoint = (out / "state.safetensors").is_file()
    # Files of a first epoch whose checkpoint was never committed (the process stopped while writing it)
    # are redone; a run that finished (summary.json) or checkpointed more than one epoch has lost its state.
    if resume and not has_checkpoint and ((out / "summary.json").exists()
                                          or len(runs.read_jsonl(out / "metrics.jsonl")) > 1):
        raise RunError(f"{out} has trained epochs (model.safetensors, metrics.jsonl) but no state.safetensors, the "
                       "checkpoint a resume continues from, so it cannot be resumed; training again would "
                       f"overwrite them. Its weights still load (vaekit sample {out}, vaekit eval {out}); to train "
                       "more, start a new run with another --out.")
    if resume and not has_checkpoint:
        typer.echo(f"{out} has no checkpoint yet (it stopped before writing its first one); training it again "
                   "from the start with its config.json.", err=True)
    done = [m["epoch"] for m in runs.read_jsonl(out / "metrics.jsonl") if "epoch" in m] if has_checkpoint else []
    if resume and done and max(done) >= cfg.train.epochs:
        more = (f"give --epochs with more than {max(done)}" if cfg.train.lr_schedule == "constant" else
                f"train a new run with more epochs (its {cfg.train.lr_schedule} learning-rate schedule is laid "
                "over the epochs it was given)")
        typer.echo(f"{out} has finished its {max(done)} epochs, so there is nothing to train; its figures and "
                   f"report are redrawn. To train longer, {more}.", err=True)
    if not resume and cfg.train.objective == "iwae" and cfg.train.k == 1 and not cfg.train.dreg:
        typer.echo("note: the IWAE bound with k = 1 is the ELBO (its KL sampled); give --k (e.g. 5 or 50) for a "
                   "tighter bound.", err=True)
    if not resume and cfg.train.grad_samples >= cfg.train.k > 1:
        typer.echo(f"note: --grad-samples {cfg.train.grad_samples} is not fewer than k = {cfg.train.k}, so every "
                   "sample is backpropagated, as with 0.", err=True)
    created = None if resume else runs.create_run(out, cfg)
    t0 = time.perf_counter()
    try:
        fit(model, cfg, splits, out, resume=resume and has_checkpoint, progress=progress,
            on_epoch=lambda r: typer.echo(
                f"epoch {r['epoch']:>3}  "
                + (f"train loss {r['train_loss']:.2f} (norm penalty)" if cfg.train.objective == "norm-penalty"
                   else f"train -ELBO {r['train_nelbo']:.2f}")
                + f"  valid -ELBO {r['valid_nelbo']:.2f} "
                f"(recon {r['valid_recon']:.2f}, KL {r['valid_kl']:.2f})"
                + (f"  valid -L_{cfg.train.k} {r['valid_iwae_loss']:.2f}" if "valid_iwae_loss" in r else "")
                + f"  {r['seconds']:.1f}s", err=True))
    except Exception:
        if not resume and not (out / "state.safetensors").is_file():
            runs.discard_run(out, created)  # failed before its first checkpoint: nothing worth keeping
        raise
    summary = finish_run(out, progress=progress)
    split = "test" if "test" in summary else "valid"
    if not math.isfinite(summary[split]["elbo"]):
        from vaekit.train import diverged

        raise RunError(diverged(f"the {split} ELBO of its best weights is {summary[split]['elbo']} (the run's "
                                f"files and report are in {out})"))
    density = " (of a density: Gaussian decoder)" if cfg.model.likelihood == "gaussian" else ""
    typer.echo(f"done in {time.perf_counter() - t0:.1f}s: {split} ELBO {summary[split]['elbo']:.2f} nats{density}; "
               f"report: {out / 'report.html'}")


# ----------------------------------------------------------------------------- use a run
_DEFAULT_SPLIT = "(default: test if the data has one, else valid)."


def _split(run: Path, split: Optional[str], limit: Optional[int] = None, data: Optional[Path] = None):
    """(config, data set, split name) of a split of a run's data; split None: test if there is one, else valid.

    data: instead, the examples of that file or folder, checked against the model, named "of_" + its stem.
    """
    if split is not None and split not in ("train", "valid", "test"):
        raise ConfigError(f"--split must be train, valid or test; got '{split}'.")
    cfg = runs.load_config(run)
    if data is not None:
        if split is not None:
            raise ConfigError("--data and --split both given: --data brings its own examples, so drop --split.")
        ds = _new_data(cfg, data)
        name = "of_" + Path(data).expanduser().resolve().stem  # codes_of_NAME.npz: no split's file is overwritten
        return cfg, (ds if limit is None else ds.take(slice(0, limit))), name
    splits = _run_splits(run, cfg)
    _same_shape(run, cfg, splits.train)
    if split is None:
        split = "test" if splits.test is not None else "valid"
    ds = {"train": splits.train, "valid": splits.valid, "test": splits.test}[split]
    if ds is None:
        raise VaekitError(f"this data set has no {split} split; use --split valid.")
    if limit is not None:
        ds = ds.take(slice(0, limit))
    return cfg, ds, split


def _run_splits(run: Path, cfg: RunConfig):
    """The splits of the data a run was trained on, or a clear error if that data is no longer found."""
    from vaekit.data import Splits, grey_as_colour, load_splits

    source = cfg.data.source
    if source != "mnist" and not Path(source).expanduser().exists():
        raise ConfigError(f"{run} was trained on '{source}', which is not found from here (a relative path is "
                          f"relative to the folder the run was trained in); run from there, or set data.source "
                          f"in {Path(run) / 'config.json'} to the data's path.")
    splits = load_splits(cfg.data)
    if source == "mnist" or not Path(source).expanduser().is_dir():
        return splits
    shape = cfg.model.input_shape  # an image folder of grey images, read as three channels by older versions
    return Splits(*(None if ds is None else grey_as_colour(ds, shape) for ds in (splits.train, splits.valid,
                                                                               splits.test)))


def _same_shape(run: Path, cfg: RunConfig, ds) -> None:
    """DataError if the run's own data no longer has the examples' shape the model was trained on."""
    if list(ds.shape) != list(cfg.model.input_shape):
        raise DataError(f"{run} trained on examples shaped {list(cfg.model.input_shape)}, and its data "
                        f"{cfg.data.source} now holds {list(ds.shape)}: the data has changed since the run began. "
                        "Put the run's data back, or train a new run on this data (eval, encode, reconstruct "
                        "and interpolate take other images with --data).")


def _not_the_input(out: Optional[Path], data: Optional[Path], run: Path) -> None:
    """ConfigError if writing an output file would change data: replace the --data file or the run's
    own training data (for MNIST, the cache), or put a file into either one's folder."""
    if out is None:
        return
    _outside(out, None if data is None else Path(data), "the --data")  # --data mnist is a path like any
    _outside(out, _source_path(runs.load_config(run).data.source), "the run's training data")


def _source_path(source: str) -> Path:
    """Where a run's data.source lives: a path, or for "mnist" the cache folder."""
    from vaekit.data import mnist_cache_path

    return mnist_cache_path().parent if source == "mnist" else Path(source)


def _outside(out: Path, source: Optional[Path], what: str) -> None:
    """ConfigError if `out` is the data at `source` or inside it (a link into it counts)."""
    if source is None:
        return
    path = source.expanduser().resolve()
    target = Path(out).expanduser().resolve()
    places = [path]
    if path.is_dir():  # an image folder's class folders and images may be links to elsewhere
        links = [p for p in path.iterdir() if p.is_symlink()]
        links += [f for sub in path.iterdir() if sub.is_dir() for f in sub.iterdir() if f.is_symlink()]
        for link in links:
            try:
                places.append(link.resolve(strict=False))
            except (OSError, RuntimeError):  # a loop of links: the loader skips it, and so can we
                pass
    for place in places:
        if target == place or place in target.parents:
            where, does = ("is", "replace") if target == place else ("is inside", "change")
            raise ConfigError(f"{out} {where} {what} ({place}); writing it would {does} that data. "
                              "Write the results somewhere else.")


def _write_npz(path: Path, arrays: dict) -> None:
    """numpy arrays to an .npz, whole or not at all (its folder made if missing)."""
    import numpy as np

    _make_folder(path.parent)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    with _writable(path.parent):
        runs.atomic_write(path, write)


def _new_data(cfg: RunConfig, data: Path):
    """The examples of a file or folder other than the run's own, if the model can take them; class
    subfolders are numbered as the model numbers its classes (by name)."""
    from dataclasses import replace

    from vaekit.data import check_unit_range, grey_as_colour, load_path

    path = Path(data).expanduser()
    ds = load_path(path)
    if path.is_dir():  # grey images for a model of colour ones: as their RGB copies
        ds = grey_as_colour(ds, cfg.model.input_shape)
    if ds.shape != tuple(cfg.model.input_shape):
        raise DataError(f"{data}: its examples have shape {list(ds.shape)}, and this model takes "
                        f"{list(cfg.model.input_shape)}, the shape of the data it was trained on.")
    if cfg.model.likelihood == "bernoulli":
        check_unit_range(ds)
    if not cfg.model.n_classes:
        return ds
    if ds.y is None:
        raise DataError(f"{data} has no labels, and this conditional model takes each example with its label: "
                        "give them (a 'y' array in an .npz, or one subfolder per class).")
    if ds.classes is None:
        return ds
    names = cfg.model.class_names
    if not names:
        raise DataError(f"{data} names its classes by its subfolders, and this run's config.json records no class "
                        "names to match them to; give the examples as an .npz with a 'y' array of class numbers.")
    unknown = [c for c in ds.classes if c not in names]
    if unknown:
        raise DataError(f"{data}: subfolders {', '.join(unknown)} are none of this model's classes "
                        f"({', '.join(names)}).")
    number = torch.tensor([names.index(c) for c in ds.classes])  # the folder's label i is the model's number[i]
    return replace(ds, y=number[ds.y], classes=names)


def _eval_images(run: Path, split: Optional[str], limit: Optional[int] = None, data: Optional[Path] = None):
    """(config, images, labels, split name) of a run's split (or of other data), binarized as evaluation
    does; labels only for a conditional model."""
    from vaekit.train import eval_set, labels_for

    cfg, ds, split = _split(run, split, limit, data)
    return cfg, eval_set(ds, cfg.data), labels_for(ds, cfg.model), split


def _class_number(model: ModelConfig, label: str | None) -> int | str | None:
    """--label as a class number: a name the model's classes were given, or a number as it is."""
    if label is None or not model.n_classes:
        return label  # a model without classes refuses any label (generate.sample says so)
    if label in model.class_names:  # a name wins over a number: subfolders 1, 2, 3 are classes 0, 1, 2
        return model.class_names.index(label)
    named = f"or one of its classes' names: {', '.join(model.class_names)}" if model.class_names else \
        "(this run's config.json records no class names)"
    try:
        number = int(label)
    except ValueError:
        number = -1
    if not 0 <= number < model.n_classes:
        raise ConfigError(f"--label {label!r}: give a class number 0..{model.n_classes - 1} {named}.")
    return number


@app.command()
def sample(
    run: Path = typer.Argument(..., help="Run directory."),
    n: int = typer.Option(64, "--n", help="How many samples."),
    seed: int = typer.Option(0, "--seed"),
    label: Optional[str] = typer.Option(None, "--label", help="Conditional models: the class to draw, by its "
                                        "name (an image folder's subfolder) or number; a name wins (default: every "
                                        "class in turn)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN/samples.png)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Decode z ~ N(0, I) into a grid of images."""
    from vaekit import generate, plots

    _check_count(n, 1024, "images a readable grid holds")
    _check_seed(seed)
    model = runs.load(run)
    path = _out_file(out, ".png", run, overwrite=overwrite)
    path = path or Path(run) / "samples.png"
    imgs = generate.sample(model, n, seed=seed, label=_class_number(model.cfg, label))
    _save_figures(path.parent, {path.name: plots.samples(imgs)})
    typer.echo(str(path))


@app.command()
def reconstruct(
    run: Path = typer.Argument(..., help="Run directory."),
    n: int = typer.Option(8, "--n", help="How many images."),
    split: Optional[str] = typer.Option(None, "--split", help="train, valid or test " + _DEFAULT_SPLIT),
    data: Optional[Path] = typer.Option(None, "--data", help="Images from this file or folder (.npz, .npy, "
                                        "IDX, image folder) instead of the run's own data."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN/reconstructions.png; "
                                       "with --split S, RUN/reconstructions_S.png; with --data NAME.npz, "
                                       "RUN/reconstructions_of_NAME.png)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Show images above their reconstructions."""
    from vaekit import generate, plots

    _check_count(n, 256, "pairs a readable figure holds")
    model = runs.load(run)
    path = _out_file(out, ".png", run, data=data, overwrite=overwrite)
    _, x, y, name = _eval_images(run, split, limit=n, data=data)
    # the report's figure is of the default split; other images get a file of their own
    path = path or Path(run) / ("reconstructions.png" if split is None and data is None else
                                f"reconstructions_{name}.png")
    _save_figures(path.parent, {path.name: plots.reconstructions(x, generate.reconstruct(model, x, y))})
    typer.echo(str(path))


@app.command()
def encode(
    run: Path = typer.Argument(..., help="Run directory."),
    split: Optional[str] = typer.Option(None, "--split", help="train, valid or test: the images to encode "
                                        + _DEFAULT_SPLIT),
    data: Optional[Path] = typer.Option(None, "--data", help="Encode this file or folder (.npz, .npy, IDX, "
                                        "image folder) instead of the run's own data."),
    out: Optional[Path] = typer.Option(None, "--out", help=".npz to write (default RUN/codes_SPLIT.npz, or "
                                       "RUN/codes_of_NAME.npz for --data NAME.npz)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Encode a split of the run's data, or other data, to the means of q(z|x), written as an .npz.

    The file holds `z` (N, latent size) and, when the data has labels, `y` (N,), in the data's order,
    plus `classes`, label i's name, when the data names them (an image folder); load it with
    numpy.load. Images are binarized as the run's evaluation binarizes them (a streamed split,
    chunk by chunk). For a model with two stochastic layers each row of `z` is z1 followed by z2: the mean of
    q(z1|x), then the mean of q(z2|z1) at that z1 (latent1_dim + latent_dim columns).
    """
    import numpy as np

    from vaekit import generate
    from vaekit.train import eval_set, labels_for

    model = runs.load(run)
    path = _out_file(out, ".npz", run, data=data, overwrite=overwrite)
    cfg, ds, split = _split(run, split, data=data)
    path = path or Path(run) / f"codes_{split}.npz"
    parts = [ds] if not ds.streamed else [  # a streamed split need not fit in memory at once
        ds.take(torch.arange(i, min(i + ENCODE_PART, len(ds)))) for i in range(0, len(ds), ENCODE_PART)]
    pixels = torch.Generator().manual_seed(cfg.data.binarize_seed)  # the parts binarized as one split would be
    z = torch.cat([generate.encode_mean(model, eval_set(part, cfg.data, generator=pixels),
                                        y=labels_for(part, cfg.model)) for part in parts]).numpy()
    arrays = {"z": z} if ds.y is None else {"z": z, "y": ds.y.numpy()}
    if ds.y is not None and ds.classes:
        arrays["classes"] = np.array(ds.classes)  # the name of each label, for y's plots
    _write_npz(path, arrays)
    typer.echo(f"{path}: z {z.shape[0]} × {z.shape[1]}" + ("" if ds.y is None else ", y")
               + (", classes" if "classes" in arrays else ""))


@app.command(context_settings={"ignore_unknown_options": True})  # so that a negative index gets our message
def interpolate(
    run: Path = typer.Argument(..., help="Run directory."),
    a: int = typer.Argument(..., help="Index of the first image in the split."),
    b: int = typer.Argument(..., help="Index of the second image in the split."),
    split: Optional[str] = typer.Option(None, "--split", help="train, valid or test " + _DEFAULT_SPLIT),
    data: Optional[Path] = typer.Option(None, "--data", help="Images from this file or folder (.npz, .npy, "
                                        "IDX, image folder) instead of the run's own data."),
    steps: int = typer.Option(10, "--steps", help="Points on the line, ends included."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN/interpolation_A_B.png; "
                                       "with --split S or --data NAME.npz, RUN/interpolation_S_A_B.png or "
                                       "RUN/interpolation_of_NAME_A_B.png)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Decode the straight line between the posterior means of two images of the run's data."""
    from vaekit import generate, plots
    from vaekit.train import eval_set, labels_for

    if not 2 <= steps <= 100:
        raise ConfigError(f"--steps must be between 2 and 100; got {steps}.")
    model = runs.load(run)
    path = _out_file(out, ".png", run, data=data, overwrite=overwrite)
    given = split is not None or data is not None
    cfg, ds, split = _split(run, split, data=data)
    path = path or Path(run) / (f"interpolation_{split}_{a}_{b}.png" if given else f"interpolation_{a}_{b}.png")
    source = f"the {split} split" if data is None else str(data)
    for name, i in (("A", a), ("B", b)):
        if not 0 <= i < len(ds):
            raise ConfigError(f"image {name} = {i} is out of range: {source} has {len(ds)} images "
                              f"(0 to {len(ds) - 1}).")
    pair = ds.take(torch.tensor([a, b]))
    x, y = eval_set(pair, cfg.data), labels_for(pair, cfg.model)
    strip = generate.interpolate(model, x[:1], x[1:], steps=steps,
                                 y_a=None if y is None else y[:1], y_b=None if y is None else y[1:])
    title = (f"Interpolation between {split if data is None else Path(data).name} images {a} and {b} "
             "(decoded along a line between the means of q(z|x); the two images at the ends)")
    _save_figures(path.parent, {path.name: plots.interpolations(strip, title=title, originals=x[None])})
    typer.echo(str(path))


@app.command()
def plot(run: Path = typer.Argument(..., help="Run directory.")) -> None:
    """(Re)write every figure of a run and its report.html."""
    finish_run(run)
    typer.echo(str(Path(run) / "report.html"))


@app.command(name="eval")
def eval_(
    run: Path = typer.Argument(..., help="Run directory."),
    k: int = typer.Option(5000, "--k", help="Importance samples per image (the field's protocol: 5000)."),
    split: Optional[str] = typer.Option(None, "--split", help="valid or test " + _DEFAULT_SPLIT),
    data: Optional[Path] = typer.Option(None, "--data", help="Score this file or folder (.npz, .npy, IDX, image "
                                        "folder) instead of a split of the run's data; the run is left as it is."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Also write each image's -log p(x) to this "
                                          ".npz (array nll, in the data's order; y too when there are labels)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (decoder matmuls; sums in fp32). bf16 "
                                  "is faster only where the CPU multiplies bf16 fast (docs/results.md)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the importance samples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the file --scores names if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's "
                                          "choice, the physical cores)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", show_default=False,
                                            help="Show a progress bar (default: when stderr is a terminal)."),
) -> None:
    """Estimate log p(x) by importance sampling (q(z|x) as proposal, k samples), plus the ELBO parts, in nats.

    The result is also written into the run's summary.json (under "<split>_eval") and report.html,
    except for --data: other data is only scored. Per-image scores (--scores) are what anomaly
    detection ranks by: an image the model finds unlikely has a high -log p(x).
    """
    _set_threads(threads)
    progress = _progress(progress)
    dev = _device(device)
    from vaekit.evaluate import evaluate, is_binary
    from vaekit.train import eval_set, labels_for

    if split is not None and split not in ("valid", "test"):
        raise VaekitError(f"--split must be valid or test, got '{split}'.")
    if k < 1 or (limit is not None and limit < 1):
        raise VaekitError("--k and --limit must be at least 1.")
    if k > MAX_EVAL_K:
        raise VaekitError(f"--k {k} is more than {MAX_EVAL_K:,} samples an image; the field's estimate uses 5000, "
                          "and each tenfold costs tenfold the time while the bound tightens only slowly.")
    _check_seed(seed)
    scores = _out_file(scores, ".npz", run, data=data, overwrite=overwrite, option="--scores")
    cfg, ds, split = _split(run, split, limit, data)
    if ds.streamed:  # only other data can be: a run's valid and test splits are read into memory
        if limit is None:
            raise DataError(f"{data} is larger than memory, and eval holds the examples it scores in memory; "
                            "score its first N with --limit N, or split the file.")
        ds = ds.in_memory()
    x, y = eval_set(ds, cfg.data), labels_for(ds, cfg.model)  # y: a conditional model's labels
    model = runs.load(run, device=dev)
    result = evaluate(model, x, y_all=y, k=k, precision=precision, seed=seed, progress=progress,
                      per_image=scores is not None)
    per_image = result.pop("nll_per_image", None)
    chosen_by = f"validation -L_{cfg.train.k}" if cfg.train.objective == "iwae" else "validation ELBO"
    result.update({"split": split} if data is None else {"data": str(data)})
    result.update(binarization=cfg.data.binarize, binarize_seed=cfg.data.binarize_seed, seed=seed,
                  weights=f"model.safetensors (best epoch by {chosen_by})")
    notes = []
    if y is not None:
        notes.append("a conditional model: nll is -log p(x|y), given each image's label")
    if cfg.train.objective == "norm-penalty":
        notes.append(f"trained with a norm penalty, not this model's ELBO: nll is -log p(x) under the model "
                     f"sampling draws from, z ~ N(0, I), x ~ N(decoder(z), {cfg.model.sigma}^2 I), with N(f(x), I) "
                     "as the proposal")
    if cfg.model.likelihood == "gaussian":
        notes.append("a Gaussian decoder: nll is -log of a density of the values as they are (no "
                     "dequantization), so it can be negative, and it compares neither with a Bernoulli "
                     "decoder's nats nor with the bits/dim of dequantized image models")
    if cfg.model.likelihood == "bernoulli" and not is_binary(x):
        notes.append("the images are grey, not 0/1: a Bernoulli decoder's 'log p(x)' of grey values is a "
                     "cross-entropy, not a log-likelihood of the images, and does not compare with results on "
                     "binarized images (train with --binarize dynamic for those)")
    if k == 1:
        notes.append("with k = 1 the estimate is a one-sample ELBO (its KL sampled), no tighter than the ELBO; "
                     "use k of 100 or more for log p(x)")
    if notes:
        result["note"] = "; ".join(notes)
    if scores is not None:
        _write_npz(scores, {"nll": per_image.numpy()} if ds.y is None else
                   {"nll": per_image.numpy(), "y": ds.y.numpy()})
    _show_eval(result, as_json, cfg, split, k, precision, data, scores)
    if data is None:  # recorded after it is shown: a run folder one cannot write to loses no result
        try:
            _record_eval(Path(run), split, k, result)
        except OSError as e:
            raise RunError(f"the result above is not recorded: cannot write into {run} ({e.strerror}).") from None


def _record_eval(run: Path, split: str, k: int, result: dict) -> None:
    """The result into the run's summary.json and report, unless it keeps a fuller one of these weights."""
    summary_path = run / "summary.json"
    summary = runs.read_json(summary_path, default={})
    kept = summary.get(f"{split}_eval")
    fuller = kept is not None and kept.get("k", 0) >= k and kept.get("n_images", 0) >= result["n_images"] \
        and (kept.get("k"), kept.get("n_images")) != (k, result["n_images"])
    if fuller:  # a quick look does not replace a more thorough result of the same weights
        typer.echo(f"not recorded: {summary_path} keeps the {split} result with k = {kept['k']} over "
                   f"{kept['n_images']} images, more than this one's.", err=True)
    else:
        runs.write_json(summary_path, {**summary, f"{split}_eval": result})
        write_report(run)


def _show_eval(result: dict, as_json: bool, cfg: RunConfig, split: str, k: int, precision: str,
               data: Optional[Path], scores: Optional[Path]) -> None:
    if as_json:
        typer.echo(runs.dumps(result))
        return
    typer.echo(f"{data if data is not None else split + ' set'}, {result['n_images']} images, binarization "
               f"{cfg.data.binarize} (seed {cfg.data.binarize_seed}); {result.get('estimator', '')}, k = {k}, "
               f"{precision}")
    for key in ("nll", "nll_stderr", "nelbo", "recon", "kl", "bits_per_dim", "active_units", "active_units_z1",
                "active_units_z2"):
        if key in result:
            value = result[key]
            typer.echo(f"  {key:>13}  {value:.3f}" if isinstance(value, float) else f"  {key:>13}  {value}")
    if "note" in result:
        typer.echo(f"  note: {result['note']}")
    if scores is not None:
        typer.echo(f"  per-image -log p(x): {scores}")


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for compare.png, rate_distortion.png "
                                       "and report.html (default ./compare)."),
    n: int = typer.Option(8, "--n", help="Images per row."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the figures and report.html if the "
                                   "folder --out names holds them (in ./compare they are always replaced)."),
) -> None:
    """Reconstructions of several runs side by side, with their test ELBO, and each run's rate (KL) against
    its distortion (reconstruction term)."""
    from vaekit import generate, plots, report
    from vaekit.train import eval_set, labels_for

    _check_count(n, 64, "images a readable row holds")
    named, out = out is not None, (out or Path("compare")).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; compare writes its figures and report.html into a folder.")
    if (out / "config.json").exists():
        raise ConfigError(f"--out {out} is a run directory, and compare would replace its report.html; "
                          "give another folder.")
    for run in run_dirs:
        _not_the_input(out / "compare.png", None, run)
    written = ("compare.png", "rate_distortion.png", "report.html")
    there = [name for name in written if os.path.lexists(out / name)]
    if named and there and not overwrite:
        raise ConfigError(f"--out {out} already holds {', '.join(there)}; name a new folder, or pass "
                          "--overwrite to replace them.")
    rows, table, points, others = [], [], [], []
    # Every run reconstructs the first run's images (with their labels, for a conditional model).
    first_cfg, ds0, split0 = _split(run_dirs[0], None, limit=n)
    x0 = eval_set(ds0, first_cfg.data)
    for run in run_dirs:
        cfg = runs.load_config(run)
        summary = runs.read_json(Path(run) / "summary.json", default={})
        split = "test" if "test" in summary else "valid"
        elbo_value = summary.get(split, {}).get("elbo")
        if list(cfg.model.input_shape) != list(first_cfg.model.input_shape):
            raise VaekitError(f"{run} was trained on images of shape {list(cfg.model.input_shape)}, unlike "
                              f"{run_dirs[0]} ({list(first_cfg.model.input_shape)}); compare runs of one kind "
                              "of image.")
        if cfg.model.n_classes and ds0.y is None:
            raise DataError(f"{run} is conditional: it reconstructs images given their labels, and the images "
                            f"of {run_dirs[0]}, which every run reconstructs, have no labels. Put a run of "
                            "labelled data first.")
        y = labels_for(ds0, cfg.model)  # None unless this run is conditional
        other = cfg.data.source != first_cfg.data.source
        others.extend([Path(run).name] if other else [])
        rows.append((f"{Path(run).name} (z={cfg.model.latent_dim}{', other data' if other else ''})",
                     generate.reconstruct(runs.load(run), x0, y), elbo_value))
        sigma = "learned" if cfg.model.learn_sigma else f"{cfg.model.sigma:g}"
        table.append((Path(run).name, os.path.relpath(Path(run) / "report.html", out),
                      {"likelihood": cfg.model.likelihood + (f" (σ {sigma})" if cfg.model.likelihood == "gaussian"
                                                            else ""),
                       "binarization": cfg.data.binarize, "latent_dim": cfg.model.latent_dim, **summary}))
        points.append((Path(run).name, cfg, split, summary.get(split, {})))
    splits = " or ".join(sorted({"test" if "test" in summary else "valid" for _, _, summary in table}))
    figs = {"compare.png": plots.compare(x0, rows)}
    captions = [(f"Reconstructions of the same {split0} images by each run, with its {splits} ELBO (nats per "
                 "image; higher is better)." + (f" Marked 'other data' ({', '.join(others)}): trained on other data "
                 "than the first run, so they reconstruct images unlike their own, and their ELBO is on their own "
                 "data, not comparable." if others else ""), "compare.png")]
    shown, caption = _rate_distortion_points(points)
    if shown:
        figs["rate_distortion.png"] = plots.rate_distortion(shown)
        captions.append((caption, "rate_distortion.png"))
    _save_figures(out, figs)
    unlike = [name for name, cfg, split, _ in points[1:] if _measured_as(cfg, split) != _measured_as(*points[0][1:3])]
    intro = ("" if not unlike else
             f"The nats of {', '.join(unlike)} are not measured like those of {points[0][0]} (another likelihood, "
             "data, split or binarization, or a conditional model): their numbers do not compare with its.")
    html = report.index_report("vaekit comparison", table, captions, intro=intro,
                               text_columns=("likelihood", "binarization"))
    with _writable(out):
        if not shown and os.path.lexists(out / "rate_distortion.png"):
            os.remove(out / "rate_distortion.png")  # another comparison's figure, not this one's
        runs.write_text(out / "report.html", html)
    typer.echo(str(out / "report.html"))


def _measured_as(cfg: RunConfig, split: str) -> tuple:
    """What a run's nats are measured on and under: runs compare only where this is equal."""
    m, d = cfg.model, cfg.data
    return (d.source, d.binarize, split, d.valid_fraction, d.split_seed, d.mnist_valid, m.likelihood,
            "learned" if m.learn_sigma else m.sigma, bool(m.n_classes))


def _rate_distortion_points(points: list[tuple[str, RunConfig, str, dict]]) -> tuple[list, str]:
    """The (name, rate, distortion) points of the runs whose nats are measured alike, and the caption.

    Nats of reconstruction are comparable only between runs that score the same images under the
    same likelihood: the first evaluated run sets the kind, and runs of another kind (a Gaussian
    decoder beside a Bernoulli one, other data or binarization, a conditional model, whose bound is
    on log p(x|y)) are left out and named, as are runs not yet evaluated.
    """
    shown, unevaluated, unlike, first = [], [], [], None  # first: the (config, split) the others must match
    for name, cfg, split, about in points:
        rate, distortion = about.get("kl"), about.get("recon")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (rate, distortion)):
            unevaluated.append(name)
        elif first is None or _measured_as(cfg, split) == _measured_as(*first):
            first = first or (cfg, split)
            shown.append((f"{name} (z={cfg.model.latent_dim})", rate, distortion))
        else:
            unlike.append(name)
    split = "" if first is None else first[1]
    caption = (f"What each run's {split} −ELBO is made of: the nats its code carries (rate, the KL) and the "
               "nats its reconstructions miss (distortion). Each dashed line joins the points of one −ELBO; a "
               "larger z, or a smaller β, usually buys a lower distortion for a higher rate.")
    if first is not None and first[0].model.likelihood == "gaussian":
        caption += " Under a Gaussian decoder the distortion is a negative log density, and can be below 0."
    if unlike:
        caption += (f" Left out, as their nats are not measured like those of the first run evaluated (another "
                    f"likelihood, data, split or binarization, or a conditional model): {', '.join(unlike)}.")
    if unevaluated:
        caption += f" Left out, with no finite ELBO on record (not evaluated yet): {', '.join(unevaluated)}."
    return shown, caption


# ----------------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument("mnist", help="Data set name (mnist)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if the cache verifies."),
) -> None:
    """Download a data set into the cache ($VAEKIT_HOME, default ~/.cache/vaekit) and verify it."""
    from vaekit.data import fetch_mnist

    if name != "mnist":
        raise VaekitError(f"unknown data set '{name}'; vaekit can fetch: mnist. For your own data pass a path to --data.")
    typer.echo(str(fetch_mnist(force=force, log=lambda m: typer.echo(m, err=True))))


@data_app.command("import")
def data_import(path: Path = typer.Argument(..., help="Folder with the 4 MNIST IDX files, or mnist.pkl.gz.")) -> None:
    """Place MNIST files you downloaded by hand into the cache (verified)."""
    from vaekit.data import import_mnist

    typer.echo(str(import_mnist(path)))


@data_app.command("info")
def data_info(spec: str = typer.Argument("mnist", help="'mnist' or a path.")) -> None:
    """Describe a data set: splits, shapes, dtypes, value range, labels."""
    from vaekit.data import load_data, value_range

    splits = load_data(spec)
    for name in ("train", "valid", "test"):
        ds = getattr(splits, name)
        if ds is None:
            continue
        lo, hi = value_range(ds)
        values = (f"values {round(lo * 255)}..{round(hi * 255)}, read as [{lo:.3g}, {hi:.3g}]"
                  if ds.x.dtype == torch.uint8 else f"values [{lo:.3g}, {hi:.3g}]")
        labels = "none" if ds.y is None else f"{int(ds.y.max()) + 1} classes"
        if ds.classes is not None:
            labels += f" ({', '.join(ds.classes)})"
        where = f", streamed from {ds.source}" if ds.streamed else ""
        typer.echo(f"{name:>6}: {len(ds)} × {tuple(ds.shape)} {str(ds.x.dtype).replace('torch.', '')}, "
                   f"{values}, labels {labels}{where}")


@app.command()
def presets() -> None:
    """List the presets and where each comes from."""
    for name in PRESETS:
        typer.echo(f"{name:>16}  {PRESET_SOURCES.get(name, '')}")


@app.command()
def version() -> None:
    """Print the vaekit version."""
    typer.echo(__version__)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the vaekit version and exit."),
) -> None:
    pass  # the options of `vaekit` itself; its help is the Typer app's


# ----------------------------------------------------------------------------- entry point
def _say_interrupted(argv: list[str]) -> None:
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--out=")] + \
        [b for a, b in zip(argv, argv[1:]) if a == "--out"]
    out = Path(given[-1]) if argv[:1] == ["train"] and given else None
    if out is None or not (out / "config.json").is_file():
        typer.echo("interrupted" + (": nothing was saved." if argv[:1] == ["train"] else "."), err=True)
    elif (out / "state.safetensors").is_file():
        typer.echo(f"interrupted: the run is saved up to its last checkpoint; continue it with `vaekit train --out "
                   f"{out} --resume` (the run keeps its config: flags that would change it are refused).", err=True)
    else:
        typer.echo(f"interrupted before the first checkpoint; `vaekit train --out {out} --resume` starts the run "
                   "again with its config.", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 2 bad input/usage, 1 internal error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        # Standalone mode: typer reports usage errors itself and exits 2 through SystemExit.
        app(args=argv, prog_name="vaekit")
    except SystemExit as e:  # typer turns Ctrl-C into exit code 130
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:
            _say_interrupted(argv)
        return code
    except VaekitError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        _say_interrupted(argv)
        return 130
    except Exception:
        traceback.print_exc()
        typer.echo("internal error: this is a bug in vaekit; please report it with the traceback above.", err=True)
        return 1
    return 0


def _plain_warning(message, category, filename, lineno, line=None, *, _default=warnings.formatwarning) -> str:
    """A user warning as one line, as the CLI's errors are; other warnings as Python shows them."""
    if category is UserWarning:
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def run() -> None:
    warnings.formatwarning = _plain_warning
    sys.exit(main())
