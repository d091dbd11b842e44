"""Frozen, typed configuration that round-trips through JSON.

A run is described by one `RunConfig` = model + data + train. Unknown keys are
errors that name the key, so a misspelled option can never silently read as a
default. Presets are partial dicts applied before the user's overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from vaekit.errors import ConfigError

FORMAT_VERSION = 1
MAX_WIDTH = 2**20  # layer and latent sizes: larger ones are typos (a 784 × 2**20 layer alone holds 3 GB)
MAX_K = 100_000  # samples of z per example in training

Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["relu", "tanh", "elu", "softplus", "leaky_relu", "gelu", "silu"]
Binarize = Literal["dynamic", "static", "none"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["mlp", "conv", "mlp2", "poor-man"] = "mlp"
    latent_dim: int = 20  # size of z; for "mlp2" the top layer z2
    hidden: tuple[int, ...] = (400,)  # encoder widths (after the convolutions for "conv"); the decoder mirrors them
    channels: tuple[int, ...] = (32, 64)  # "conv": stride-2 3×3 convolutions, one per entry
    latent1_dim: int = 100  # "mlp2": the lower stochastic layer z1 (IWAE paper: 100)
    hidden2: tuple[int, ...] = (100, 100)  # "mlp2": widths of the z1 <-> z2 networks
    activation: Activation = "relu"
    likelihood: Likelihood = "bernoulli"
    sigma: float = 1.0  # gaussian: the fixed σ, or the initial σ when learn_sigma
    learn_sigma: bool = False  # gaussian: learn one σ per data dimension
    sigma_min: float = 1e-3  # learned σ: its floor (a pixel that never varies would drive σ → 0, log p → ∞)
    n_classes: int = 0  # > 0: a conditional VAE, encoder and decoder both given the label (one-hot)
    class_names: tuple[str, ...] = ()  # conditional: names of labels 0, 1, ... when the data names them
    input_shape: tuple[int, ...] = (1, 28, 28)  # per-example shape, set from the data

    def check(self) -> None:
        for name in ("latent_dim", "latent1_dim"):
            if not 1 <= getattr(self, name) <= MAX_WIDTH:
                raise ConfigError(f"{name} must be between 1 and {MAX_WIDTH:,}, got {getattr(self, name)}.")
        for name in ("hidden", "channels", "hidden2"):
            if any(not 1 <= h <= MAX_WIDTH for h in getattr(self, name)):
                raise ConfigError(f"{name} sizes must be between 1 and {MAX_WIDTH:,}, got {list(getattr(self, name))}.")
        if self.n_classes < 0 or self.n_classes == 1:
            raise ConfigError(f"n_classes must be 0 (unconditional) or at least 2, got {self.n_classes}.")
        if len(self.class_names) > self.n_classes:
            raise ConfigError(f"class_names lists {len(self.class_names)} names for n_classes = {self.n_classes}; "
                              "a model takes names only for the classes it has.")
        if len(set(self.class_names)) < len(self.class_names):
            raise ConfigError(f"class_names must differ from each other; got {list(self.class_names)}.")
        if self.n_classes and self.arch not in ("mlp", "conv"):
            raise ConfigError(f"a conditional VAE (n_classes = {self.n_classes}) needs arch mlp or conv, "
                              f"not '{self.arch}'.")
        if self.arch == "conv" and len(self.input_shape) != 3:
            raise ConfigError(f"the conv model needs images (C, H, W); this data has shape {list(self.input_shape)}. "
                              "Use --set model.arch=mlp for flat vectors.")
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma}.")
        if self.learn_sigma and not 0 < self.sigma_min <= self.sigma:
            raise ConfigError(f"sigma_min (the floor under a learned σ) must be positive and at most the initial "
                              f"sigma {self.sigma}; got {self.sigma_min}.")
        if not self.input_shape or any(s < 1 for s in self.input_shape):
            raise ConfigError(f"input_shape must be positive sizes, got {list(self.input_shape)}.")


@dataclass(frozen=True)
class DataConfig:
    source: str = "mnist"  # "mnist" or a path to .npz/.npy, an image folder or an IDX file
    # None: the default for the data and the decoder, which RunConfig fills in (default_binarize)
    binarize: Binarize | None = None
    binarize_seed: int = 0  # for "static" training data and for the fixed binarized eval sets
    subset: int | None = None  # use only the first N training examples
    valid_fraction: float = 0.1  # user data only; for MNIST see mnist_valid
    # MNIST only: how many of its 60k training images (the last ones) are held out for validation.
    # None: the usual 10000 (a 50k/10k split); Burda et al. 2015 held out 400 and trained on the rest.
    mnist_valid: int | None = None
    split_seed: int = 0
    stream: Literal["auto", "yes", "no"] = "auto"  # .npy files: read batches from disk ("auto": if larger than memory)

    def check(self) -> None:
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"subset must be at least 1, got {self.subset}.")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}.")
        if self.mnist_valid is not None and not 1 <= self.mnist_valid < 60_000:
            raise ConfigError(f"mnist_valid must be between 1 and 59999 of MNIST's 60000 training images, "
                              f"got {self.mnist_valid}.")
        if self.mnist_valid is not None and self.source != "mnist":
            raise ConfigError(f"mnist_valid sets MNIST's validation split, but the data is {self.source!r}; "
                              "use valid_fraction for your own data.")
        if self.stream not in ("auto", "yes", "no"):
            raise ConfigError(f"stream must be auto, yes or no; got {self.stream!r}.")
        if self.stream == "yes" and self.binarize == "static":
            raise ConfigError("static binarization keeps a binarized copy of the training data in memory, which a "
                              "streamed data set does not fit; use binarize 'dynamic' or 'none', or stream 'no'.")


MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed takes


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0  # weight of the rate term: the KL (β-VAE; 1 is the ELBO), or λ of norm-penalty
    seed: int = 0
    eval_batch_size: int = 1000
    precision: Precision = "fp32"
    grad_clip: float | None = None
    checkpoint_every: int | None = None  # also checkpoint every N steps, not only at epoch ends
    objective: Literal["elbo", "iwae", "norm-penalty"] = "elbo"  # norm-penalty: the poor man's VAE loss
    k: int = 1  # samples of z per example: IWAE's importance samples, or the ELBO averaged over k (Burda et al. 2015)
    k_start: int = 0  # if set: samples of z per example in the first k_start_epochs epochs, a cheaper start
    k_start_epochs: int = 0  # (the validation loss and the choice of the best epoch always use k)
    k_start_batch_size: int = 0  # if set: the batch size of those first epochs (0: batch_size throughout)
    warmup_steps: int = 0  # β rises linearly from 0 over this many steps of batch_size examples (KL warm-up)
    dreg: bool = False  # IWAE only: the doubly reparameterized encoder gradient (Tucker et al. 2019)
    # with dreg: backpropagate through this many of the k samples per example, drawn by their weight and
    # reweighted so that the gradient stays unbiased (objectives.dreg_from_noise); 0: all k. Not in the k_start epochs.
    grad_samples: int = 0
    free_bits: float = 0.0  # nats: a floor on each latent dimension's KL in the loss (Kingma et al. 2016)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min: float = 0.0  # where the cosine schedule ends
    adam_eps: float = 1e-8  # Adam's ε (torch's default; Burda et al. 2015 used 1e-4)
    output_bias: Literal["zero", "data"] = "zero"  # the decoder's output bias at the start: zero, or fitted to
    # the training data's mean, so that p(x|z) starts at the average image (Burda et al.'s code does this)
    compile: bool = False  # torch.compile the loss (forward and backward); falls back to eager, saying why
    ema: float = 0.0  # if set: the decay of an exponential moving average of the weights, updated every step
    # (e.g. 0.999); validation, the best epoch and the saved weights are then the average's, not the raw weights

    def check(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED} (torch's range), got {self.seed}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.beta < 0:
            raise ConfigError(f"beta must be non-negative, got {self.beta}.")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps must be positive, got {self.adam_eps}.")
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"lr_min must be between 0 and lr ({self.lr}), got {self.lr_min}.")
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k (samples of z per example) must be between 1 and {MAX_K:,}, got {self.k}. "
                              "Burda et al. trained with k up to 50.")
        if self.objective == "norm-penalty" and self.k != 1:
            raise ConfigError(f"k = {self.k} has no meaning for the norm-penalty objective; drop --k.")
        if self.k_start < 0 or self.k_start_epochs < 0:
            raise ConfigError("k_start and k_start_epochs must be non-negative.")
        if (self.k_start > 0) != (self.k_start_epochs > 0):
            raise ConfigError(f"k_start ({self.k_start}) and k_start_epochs ({self.k_start_epochs}) go together: "
                              "set both (k_start samples for the first k_start_epochs epochs) or neither.")
        if self.k_start_batch_size < 0:
            raise ConfigError(f"k_start_batch_size must be non-negative (0: batch_size), got {self.k_start_batch_size}.")
        if self.k_start_batch_size and not self.k_start:
            raise ConfigError(f"k_start_batch_size ({self.k_start_batch_size}) is the batch size of the k_start "
                              "epochs; set k_start and k_start_epochs too, or drop it.")
        if self.k_start and self.objective == "norm-penalty":
            raise ConfigError("k_start has no meaning for the norm-penalty objective; drop it.")
        if self.k_start and self.k_start_epochs >= self.epochs:
            raise ConfigError(f"k_start_epochs ({self.k_start_epochs}) must be fewer than epochs ({self.epochs}), "
                              f"or the run never trains with k = {self.k}.")
        if self.warmup_steps < 0 or self.free_bits < 0:
            raise ConfigError("warmup_steps and free_bits must be non-negative.")
        if self.objective == "norm-penalty" and (self.warmup_steps > 0 or self.free_bits > 0):
            raise ConfigError("KL warm-up and free bits act on the ELBO's KL term; the norm-penalty objective has "
                              "none (its weight on ‖z‖ is --beta). Drop --warmup/--free-bits or use --objective elbo.")
        if self.objective == "iwae" and (self.free_bits > 0 or self.beta != 1.0):
            raise ConfigError("free bits and β apply to the ELBO's KL term; the IWAE objective has none. "
                              "Drop --free-bits/--beta or use --objective elbo.")
        if self.dreg and self.objective != "iwae":
            raise ConfigError("dreg (the doubly reparameterized gradient) is an estimator for the IWAE objective; "
                              "use --objective iwae or drop dreg.")
        if self.grad_samples < 0:
            raise ConfigError(f"grad_samples must be non-negative (0: backpropagate through all k samples), "
                              f"got {self.grad_samples}.")
        if self.grad_samples and not self.dreg:
            raise ConfigError("grad_samples thins the backward pass of the DReG estimator; set dreg as well "
                              "(--dreg), or drop grad_samples.")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema is the decay of a moving average of the weights and must be in [0, 1) "
                              f"(0: off; 0.999 averages over about 1000 steps), got {self.ema}.")
        if self.grad_clip is not None and self.grad_clip < 0:  # (0, like unset, clips nothing)
            raise ConfigError(f"grad_clip is the largest gradient norm and must be positive (or unset), "
                              f"got {self.grad_clip}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 step (or unset), got {self.checkpoint_every}.")


def default_binarize(source: str, likelihood: str) -> Binarize:
    """The tutorials' default: MNIST under a Bernoulli decoder is binarized afresh each time an image is
    used; other data, and any data under a Gaussian decoder, is taken as it is."""
    return "dynamic" if source == "mnist" and likelihood == "bernoulli" else "none"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.data.binarize is None:  # unset: the default for this data and decoder, written out from here on
            data = dataclasses.replace(self.data, binarize=default_binarize(self.data.source, self.model.likelihood))
            object.__setattr__(self, "data", data)

    def check(self) -> RunConfig:
        self.model.check()
        self.data.check()
        self.train.check()
        if self.train.free_bits > 0 and self.model.arch == "mlp2":
            raise ConfigError("free bits floor each latent dimension's KL, which needs a factorised q(z|x); the "
                              "two-layer model (arch mlp2) has none. Drop --free-bits or use arch mlp or conv.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **_to_jsonable(dataclasses.asdict(self))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"config format version {version} is not supported by this vaekit "
                f"(which reads version {FORMAT_VERSION}); use the vaekit release that wrote it."
            )
        return _build(cls, d, "").check()

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """Return a copy with fields overridden, e.g. ``replace(model={"latent_dim": 2})``."""
        return RunConfig.from_dict(merge(self.to_dict(), sections))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: values of ``over`` win; sub-dicts are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``d``; unknown keys and wrong types are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{where or 'root'}' must be an object, got {d!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        path = ", ".join(f"'{where}{k}'" for k in unknown)
        raise ConfigError(f"unknown config key {path}; known keys here: {', '.join(sorted(names))}.")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{where}' must be one of {', '.join(map(str, args))}; got {value!r}.")
        return value
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}.")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"'{where}' must be a finite number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}.")
        return value
    return value


# Presets: partial configs with their source. Applied before the user's options.
PRESETS: dict[str, dict[str, Any]] = {
    # pytorch/examples vae/main.py: 784-400-20, ReLU, Adam 1e-3, batch 128, 10 epochs.
    "pytorch-example": {
        "model": {"hidden": [400], "latent_dim": 20, "activation": "relu"},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 10},
    },
    # Keras "Variational AutoEncoder" (MLP version): 784-512-2, ReLU, batch 128.
    "keras-tutorial": {
        "model": {"hidden": [512], "latent_dim": 2, "activation": "relu"},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 30},
    },
    # Burda et al. 2015 (IWAE), one stochastic layer: 784-200-200-50, tanh.
    "iwae-1l": {
        "model": {"hidden": [200, 200], "latent_dim": 50, "activation": "tanh"},
        "data": {"binarize": "dynamic"},
        "train": {"batch_size": 100, "lr": 1e-3, "epochs": 100},
    },
    # Burda et al. 2015, two stochastic layers: 784-200-200-100-100-100-50, tanh.
    "iwae-2l": {
        "model": {"arch": "mlp2", "hidden": [200, 200], "latent1_dim": 100, "hidden2": [100, 100],
                  "latent_dim": 50, "activation": "tanh"},
        "data": {"binarize": "dynamic"},
        "train": {"batch_size": 100, "lr": 1e-3, "epochs": 100},
    },
    # Keras "Variational AutoEncoder" (convolutional): two stride-2 3×3 convolutions (32, 64), dense 16.
    "conv": {
        "model": {"arch": "conv", "channels": [32, 64], "hidden": [16], "latent_dim": 2, "activation": "relu"},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 30},
    },
    # The "poor man's VAE": deterministic code + fixed unit noise, λ‖z‖ instead of the KL, MSE.
    "poor-man": {
        "model": {"arch": "poor-man", "hidden": [400], "latent_dim": 20, "likelihood": "gaussian", "sigma": 0.1},
        "data": {"binarize": "none"},
        "train": {"objective": "norm-penalty", "beta": 1.0, "batch_size": 128, "lr": 1e-3, "epochs": 10},
    },
    # Conditional VAE: the pytorch-example MLP with a 2-D code, label joined to encoder and decoder input.
    "cvae": {
        "model": {"hidden": [400], "latent_dim": 2, "n_classes": 10},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 20},
    },
    # Higgins et al. 2017 (β-VAE): the ELBO's KL weighted by β > 1 for a more disentangled code.
    "beta-vae": {
        "model": {"hidden": [400], "latent_dim": 10, "activation": "relu"},
        "train": {"batch_size": 128, "lr": 1e-3, "epochs": 20, "beta": 4.0},
    },
}

PRESET_SOURCES: dict[str, str] = {
    "pytorch-example": "pytorch/examples vae/main.py (784-400-20, ReLU, Adam 1e-3, batch 128)",
    "keras-tutorial": "Keras VAE example, MLP version (784-512-2, ReLU)",
    "iwae-1l": "Burda et al. 2015, Importance Weighted Autoencoders, 1 stochastic layer (784-200-200-50, tanh)",
    "iwae-2l": "Burda et al. 2015, 2 stochastic layers (784-200-200-100-100-100-50, tanh)",
    "conv": "Keras VAE example, convolutional version (Conv 32, Conv 64, stride 2; dense 16)",
    "poor-man": "the poor man's VAE tutorial: fixed unit noise on a deterministic code, norm penalty, MSE (not its ELBO)",
    "cvae": "conditional VAE (Sohn et al. 2015; the generative model p(x|y,z) of Kingma et al. 2014, M2): "
            "784-400-2 with the one-hot label joined to the encoder's and the decoder's input",
    "beta-vae": "Higgins et al. 2017, beta-VAE (beta = 4 on a 784-400-10 MLP)",
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]
