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

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "build", "fit", "from_arrays", "load", "split",
           "__version__"]

if TYPE_CHECKING:  # type checkers and editors read these; at run time they load on first use (below)
    from vaekit.config import DataConfig as DataConfig, ModelConfig as ModelConfig, RunConfig as RunConfig
    from vaekit.config import TrainConfig as TrainConfig
    from vaekit.data import from_arrays as from_arrays, split as split
    from vaekit.models import build as build
    from vaekit.runs import load as load
    from vaekit.train import fit as fit
else:
    # The exports and the submodules load on first use (PEP 562), so `import vaekit` is quick and does
    # not load torch: the `vaekit` command (vaekit.__main__) imports its parts inside a handler for Ctrl-C.
    _EXPORTS = {"DataConfig": "config", "ModelConfig": "config", "RunConfig": "config", "TrainConfig": "config",
                "from_arrays": "data", "split": "data", "build": "models", "load": "runs", "fit": "train"}
    import pkgutil

    _SUBMODULES = {m.name for m in pkgutil.iter_modules(__path__)} - {"__main__"}
    del pkgutil

    def __getattr__(name: str):
        import importlib

        if name in _SUBMODULES:  # `import vaekit; vaekit.data.load_mnist(...)`, as when these loaded eagerly
            return importlib.import_module(f"vaekit.{name}")
        if name not in _EXPORTS:
            raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"vaekit.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
