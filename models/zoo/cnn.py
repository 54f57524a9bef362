"""A CNN with BatchNorm, DropBlock, spatial dropout and a dropout head (for MNIST).

- ``DropBlock2d`` (Ghiasi et al. 2018): train drops ``block_size`` squares per sample and channel with a
  linearly ramped drop probability (the training loop steps ``DropBlockSchedule``); eval ``x``; MC as train at
  the target probability.
- ``nn.Dropout2d`` (spatial dropout, Tompson et al. 2015): one draw per (sample, channel), ``/q``; eval ``x``.
- ``nn.Dropout`` head (Srivastava et al. 2014): inverted dropout before the classifier.

Cutout (DeVries and Taylor 2017) is used as training augmentation by this network's training recipe; it is
an input transform and not part of the network.
"""

from __future__ import annotations

from dropwise.models.layers import DropBlock2d
from torch import nn


def _conv_bn(in_c: int, out_c: int) -> list[nn.Module]:
    return [nn.Conv2d(in_c, out_c, 3, padding=1, bias=False), nn.BatchNorm2d(out_c), nn.ReLU()]


def dropblock_cnn(
    in_channels: int = 1,
    channels: tuple[int, int, int] = (16, 32, 64),
    image_size: int = 28,
    hidden: int = 128,
    out_features: int = 10,
    p_block: float = 0.1,
    block_size: int = 5,
    p_spatial: float = 0.1,
    p_head: float = 0.5,
) -> nn.Sequential:
    """Three conv-BN-ReLU stages, each followed by 2x2 max-pooling, then a dropout MLP head.

    DropBlock follows the second stage, spatial dropout the third. Input ``[B, in_channels, S, S]`` with
    ``S = image_size``, output ``[B, out_features]`` logits.
    """
    c1, c2, c3 = channels
    side = image_size // 2 // 2 // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for three 2x2 poolings")
    return nn.Sequential(
        *_conv_bn(in_channels, c1),
        nn.MaxPool2d(2),
        *_conv_bn(c1, c2),
        DropBlock2d(p_block, block_size),
        nn.MaxPool2d(2),
        *_conv_bn(c2, c3),
        nn.Dropout2d(p_spatial),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * side * side, hidden),
        nn.ReLU(),
        nn.Dropout(p_head),
        nn.Linear(hidden, out_features),
    )
