"""vaekit: variational autoencoders with honest numbers, fast on a plain CPU.

    import vaekit
    model = vaekit.load("runs/demo/z20")      # config.json + safetensors, no pickle
    q = model.encode(x)                        # q(z|x), a torch.distributions object
    p = model.decode(q.mean)                   # p(x|z)

Training from Python (README.md, "From Python"):

    cfg = vaekit.RunConfig(model=vaekit.ModelConfig(latent_dim=8, input_shape=(1, 28, 28)),
                           data=vaekit.DataConfig(source="my-arrays"))
    splits = vaekit.split(vaekit.from_arrays(images))   # numpy or torch, (N, H, W) uint8 or [0, 1] floats
    model = vaekit.build(cfg.model)
    vaekit.fit(model, cfg, splits, "runs/mine")          # a run directory that vaekit.load reads back
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# The exports load on first use (PEP 562), so `import vaekit` is quick and does not load torch:
# the `vaekit` command (vaekit.__main__) imports its parts inside a handler for Ctrl-C.
_EXPORTS = {"DataConfig": "vaekit.config", "ModelConfig": "vaekit.config", "RunConfig": "vaekit.config",
            "TrainConfig": "vaekit.config", "from_arrays": "vaekit.data", "split": "vaekit.data",
            "build": "vaekit.models", "load": "vaekit.runs", "fit": "vaekit.train"}
__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__
    from vaekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vaekit.data import from_arrays, split
    from vaekit.models import build
    from vaekit.runs import load
    from vaekit.train import fit


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
