"""Run directories: atomic files, checkpoints that describe themselves, loading without pickle.

A run directory holds
  config.json             the RunConfig (JSON, with format_version)
  model.safetensors       weights of the best epoch by validation ELBO (−L_k for IWAE runs)
  last.safetensors        weights of the last finished epoch
                          (with train.ema, both are the moving average of the weights)
  state.safetensors       the last checkpoint (for --resume): weights, optimizer moments, RNG
                          states and counters, plus the data order and running sums of an
                          epoch checkpointed part-way
  metrics.jsonl           one JSON object per epoch
  summary.json            final numbers
  *.png, report.html      figures and the report
Weights and tensors go in safetensors, everything else in JSON: loading a run
never unpickles, so it cannot run code. Every file is written atomically (a temp
file ".NAME.*.tmp" renamed over it), so a crash leaves the old file or the new
one, never half of one; a killed process may leave a temp file, which is not data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from vaekit import __version__
from vaekit.config import FORMAT_VERSION, RunConfig
from vaekit.errors import RunError

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}
# What a run holds before its first checkpoint (state.safetensors) is complete.
EARLY_FILES = {"config.json", "metrics.jsonl", "model.safetensors", "last.safetensors"}


# ----------------------------------------------------------------------------- atomic files
TEMP_SUFFIX = ".tmp"  # temp files are ".NAME.<random>.tmp" beside NAME


def atomic_write(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` into a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_file(path: Path) -> bool:
    """True for the temp files of `atomic_write` (and of `create_run`), which never hold data."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def remove_temp_files(run: Path) -> None:
    """Delete temp files a killed process left in ``run`` while writing (only ours: ".*.tmp")."""
    for p in Path(run).iterdir() if Path(run).is_dir() else ():
        if is_temp_file(p) and p.is_file():
            p.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def _strict(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: a NaN or infinite float (an undefined stderr, a diverged loss) becomes null,
    which every JSON reader accepts, where Python's default would write the bare token NaN."""
    return json.dumps(_strict(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file, one a line ([] if there is no file)."""
    if not Path(path).exists():
        return []
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        return [json.loads(line) for line in lines]
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise RunError(f"{path} is not valid JSON lines ({e}); the run directory is damaged.") from None


def read_json(path: Path, default: dict | None = None) -> dict:
    """A run's JSON file as a dict (``default`` if there is no file)."""
    if default is not None and not Path(path).exists():
        return default
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 text
        fix = (f" It holds only what `vaekit plot {Path(path).parent}` computes: delete it, and that command writes it "
               "again (results of `vaekit eval` in it are lost; run it again too)." if Path(path).name == "summary.json"
               else "")
        raise RunError(f"{path} is not valid JSON ({e}); the run directory is damaged.{fix}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    # Serialize in memory and write with Python: a full disk then raises OSError(ENOSPC),
    # where safetensors' own file writer would raise its SafetensorError.
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = safetensors_bytes(tensors, metadata=meta)
    atomic_write(path, lambda p: p.write_bytes(data))


# ----------------------------------------------------------------------------- runs
def check_run_dir(run: Path) -> Path:
    """Refuse anything that is not a vaekit run directory, before reading a byte of it."""
    run = Path(run)
    if run.is_file():
        if run.suffix in PICKLE_SUFFIXES:
            raise RunError(
                f"{run} looks like a pickled checkpoint ({run.suffix}); vaekit never loads pickles, "
                "because loading one can run arbitrary code. Give a vaekit run directory instead."
            )
        raise RunError(f"{run} is a file; give a vaekit run directory (the --out of `vaekit train`).")
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist; train one with `vaekit train --out {run}`.")
    if not (run / "config.json").is_file():
        raise RunError(f"{run} has no config.json, so it is not a vaekit run directory (or training never started).")
    return run


def create_run(run: Path, cfg: RunConfig) -> Path | None:
    """Create the run directory with its config.json in one step; return what to remove on failure.

    A new directory is filled under a temp name and renamed into place, so a crash
    leaves either no run or a run with its config. Returns the topmost directory
    created here (``run`` or a new parent of it), or None if ``run`` already existed
    (empty: `vaekit train` refuses a non-empty one).
    """
    run = Path(run)
    created = None if run.is_dir() else run
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        if created is None:
            save_config(run, cfg)
            return None
        run.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run.name}.", suffix=TEMP_SUFFIX, dir=run.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory the usual mode
            save_config(tmp, cfg)
            os.rename(tmp, run)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(run.parent)
        return created
    except OSError as e:
        if created is not None:  # parents made before the failure
            shutil.rmtree(created, ignore_errors=True)
        raise RunError(f"cannot create the run directory {run}: {e.strerror or e}. "
                       "Choose a writable place for --out.") from e


def discard_run(run: Path, created: Path | None) -> None:
    """Remove a run that failed before its first checkpoint: the directories `create_run`
    made or, in a directory the user had, only the files training writes first."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for p in Path(run).iterdir() if Path(run).is_dir() else ():
        if p.name in EARLY_FILES or (is_temp_file(p) and p.is_file()):
            p.unlink(missing_ok=True)


def load_config(run: Path) -> RunConfig:
    run = check_run_dir(run)
    d = read_json(run / "config.json")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise RunError(
            f"{run} was written with run format version {version} (vaekit {d.get('vaekit_version', '?')}); "
            f"this vaekit {__version__} reads format version {FORMAT_VERSION}. Use a matching vaekit release."
        )
    d.pop("vaekit_version", None)
    return RunConfig.from_dict(d)


def save_config(run: Path, cfg: RunConfig) -> None:
    write_json(Path(run) / "config.json", {**cfg.to_dict(), "vaekit_version": __version__})


def save_weights(path: Path, model: torch.nn.Module) -> None:
    save_tensors(path, model.state_dict(), {"format_version": str(FORMAT_VERSION)})


def load_weights(path: Path, model: torch.nn.Module) -> None:
    if not Path(path).is_file():
        raise RunError(f"{path} is missing; the run has no saved weights yet (did training finish an epoch?).")
    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        last = Path(path).with_name("last.safetensors")
        fix = (f" {last} holds the weights of the last epoch trained: to use those, copy it over {Path(path).name}."
               if Path(path).name == "model.safetensors" and last.is_file() else "")
        raise RunError(f"{path} is not a readable safetensors file ({e}); the checkpoint is damaged.{fix}") from e
    load_matching(path, model, state)


def load_matching(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """model.load_state_dict(state), or a RunError if the weights from ``path`` are of another model
    than the one config.json describes (an edited config, another run's file)."""
    own = model.state_dict()
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected or wrong:
        raise RunError(
            f"{path} does not match the model described in config.json "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}); "
            "put back the config.json the run was trained with."
        )
    model.load_state_dict(state)


def load(run: Path, which: str = "best", device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a trained model from a run directory: config.json + safetensors, no pickle."""
    from vaekit.models import build

    if which not in ("best", "last"):
        raise RunError(f"which must be 'best' (the epoch chosen on validation data) or 'last'; got {which!r}.")
    run = check_run_dir(run)
    cfg = load_config(run)
    model = build(cfg.model).to(device)
    load_weights(run / ("model.safetensors" if which == "best" else "last.safetensors"), model)
    model.eval()
    return model


# ----------------------------------------------------------------------------- optimizer state
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}
