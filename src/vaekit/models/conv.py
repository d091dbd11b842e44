"""Convolutional encoder/decoder for images of any C×H×W (the Keras VAE example's shape).

Encoder: stride-2 3×3 convolutions (`channels`, e.g. 32, 64), flatten, dense `hidden`
layers, then (μ, log σ²). Decoder: dense layers up to the last feature map, then
stride-2 transposed convolutions back to C×H×W, with output padding chosen per layer
so odd sizes come back exactly. On CPU the convolutions run in channels_last.
With n_classes > 0 the one-hot label joins the dense layers' input on both sides (a conditional VAE).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaekit.config import ModelConfig
from vaekit.models.common import (ACTIVATIONS, Likelihood, check_code, check_images, diag_gaussian, join_label, mlp,
                                  standard_normal, xavier_)


def _down(n: int) -> int:
    """Size after a 3×3 convolution with stride 2 and padding 1."""
    return (n - 1) // 2 + 1


class ConvVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_shape = tuple(cfg.input_shape)
        c, h, w = self.input_shape
        act = ACTIVATIONS[cfg.activation]
        sizes = [(h, w)]
        for _ in cfg.channels:
            sizes.append((_down(sizes[-1][0]), _down(sizes[-1][1])))
        chans = [c, *cfg.channels]
        enc: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), act()]
        self.conv_encoder = nn.Sequential(*enc)
        self.feature_shape = (chans[-1], *sizes[-1])  # (C_last, h_last, w_last)
        d_feat = math.prod(self.feature_shape)
        c = cfg.n_classes
        self.dense_encoder = mlp([d_feat + c, *cfg.hidden, 2 * cfg.latent_dim], cfg.activation)
        self.dense_decoder = mlp([cfg.latent_dim + c, *reversed(cfg.hidden), d_feat], cfg.activation,
                                 last_activation=True)
        dec: list[nn.Module] = []
        rchans, rsizes = chans[::-1], sizes[::-1]
        for i, (a, b) in enumerate(zip(rchans[:-1], rchans[1:])):
            (hi, wi), (ho, wo) = rsizes[i], rsizes[i + 1]
            pad = (ho - (2 * hi - 1), wo - (2 * wi - 1))  # output_padding so that the size is exact
            dec.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad))
            if i < len(rchans) - 2:
                dec.append(act())
        self.conv_decoder = nn.Sequential(*dec)
        self.likelihood = Likelihood(cfg)
        xavier_(self)
        self.to(memory_format=torch.channels_last)

    @property
    def output_layer(self) -> nn.Module:
        """The layer whose outputs are the parameters of p(x|z)."""
        return self.conv_decoder[-1]

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """q(z|x) for x of shape (B, C, H, W)."""
        check_images(x, self.input_shape, exact=True, like=self.dense_decoder[0].weight)
        x = x.contiguous(memory_format=torch.channels_last)
        h = join_label(self.conv_encoder(x).flatten(1), y, self.cfg.n_classes)
        return diag_gaussian(self.dense_encoder(h))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """p(x|z) for z of shape (..., B, D): batch shape (..., B), event shape (C, H, W)."""
        check_code(z, self.latent_dim)
        batch = z.shape[:-1]
        z = join_label(z, y, self.cfg.n_classes)
        f = self.dense_decoder(z.reshape(-1, z.shape[-1])).view(-1, *self.feature_shape)
        f = f.contiguous(memory_format=torch.channels_last)
        out = self.conv_decoder(f).reshape(*batch, *self.input_shape)
        return self.likelihood(out)

    def prior(self):
        return standard_normal(self.latent_dim, self.dense_decoder[0].weight)
