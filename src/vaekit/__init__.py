"""vaekit: variational autoencoders with honest numbers, fast on a plain CPU.

    import vaekit
    model = vaekit.load("runs/demo/z20")      # config.json + safetensors, no pickle
    q = model.encode(x)                        # q(z|x), a torch.distributions object
    p = model.decode(q.mean)                   # p(x|z)
"""

__version__ = "0.1.0"

from vaekit.runs import load  # noqa: E402

__all__ = ["load", "__version__"]
