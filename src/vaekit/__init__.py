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

from vaekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from vaekit.data import from_arrays, split  # noqa: E402
from vaekit.models import build  # noqa: E402
from vaekit.runs import load  # noqa: E402
from vaekit.train import fit  # noqa: E402

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "build", "fit", "from_arrays", "load", "split",
           "__version__"]
