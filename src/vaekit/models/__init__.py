"""Model registry: `build(cfg)` turns a ModelConfig into a model.

Every model provides `encode(x) -> q(z|x)`, `decode(z) -> p(x|z)` and `prior()`
as `torch.distributions` objects; the objectives and the estimator need nothing else.
"""

from __future__ import annotations

from torch import nn

from vaekit.config import ModelConfig
from vaekit.distributions import seeded
from vaekit.errors import ConfigError
from vaekit.models.conv import ConvVAE
from vaekit.models.mlp import MLPVAE
from vaekit.models.mlp2 import TwoLayerVAE
from vaekit.models.poorman import PoorMansVAE

REGISTRY: dict[str, type[nn.Module]] = {"mlp": MLPVAE, "conv": ConvVAE, "mlp2": TwoLayerVAE, "poor-man": PoorMansVAE}


def build(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """The model ``cfg`` describes; with ``seed``, its initial weights depend on nothing else."""
    if cfg.arch not in REGISTRY:
        raise ConfigError(f"unknown model architecture '{cfg.arch}'; available: {', '.join(REGISTRY)}.")
    cfg.check()
    if seed is None:
        return REGISTRY[cfg.arch](cfg)
    with seeded(seed):
        return REGISTRY[cfg.arch](cfg)
