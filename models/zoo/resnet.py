"""A small ResNet with stochastic depth (Huang et al. 2016, "Deep networks with stochastic depth").

Each residual block computes ``relu(shortcut(x) + DropPath(f(x)))``. Drop probabilities follow Huang's
linear decay rule ``p_l = l / L * p_L`` over the ``L`` blocks. ``scale_by_keep=True`` is timm's form (train:
per-sample gate ``/q``; eval: identity); ``scale_by_keep=False`` is Huang's classic form (train: one gate per
mini-batch, no rescale; eval: the branch is multiplied by ``q``). MC keeps the gates sampling as in training.
Dropout before the classifier (Srivastava et al. 2014) is inverted ``nn.Dropout``.
"""

from __future__ import annotations

from collections.abc import Sequence

from dropwise.models.layers import DropPath, linear_decay
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a DropPath-gated residual branch; 1x1 conv-BN shortcut on shape change."""

    def __init__(self, in_c: int, out_c: int, stride: int, p_drop: float, scale_by_keep: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_c, out_c, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_c),
            nn.ReLU(),
            nn.Conv2d(out_c, out_c, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_c),
        )
        self.drop_path = DropPath(p_drop, scale_by_keep=scale_by_keep)
        if stride != 1 or in_c != out_c:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_c, out_c, 1, stride=stride, bias=False), nn.BatchNorm2d(out_c)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.drop_path(self.branch(x)))


def stochastic_depth_resnet(
    in_channels: int = 1,
    widths: Sequence[int] = (16, 32),
    blocks_per_stage: int = 2,
    out_features: int = 10,
    p_last: float = 0.2,
    scale_by_keep: bool = True,
    p_head: float = 0.2,
    flat_image_shape: Sequence[int] | None = None,
    stem_pool: bool = True,
) -> nn.Sequential:
    """Stem conv -> stages of ``BasicBlock`` (stride 2 between stages) -> avg pool -> dropout -> Linear.

    Args:
        in_channels: image channels.
        widths: channels of each stage.
        blocks_per_stage: residual blocks per stage; DropPath rates decay linearly over all blocks.
        p_last: drop probability of the last block (Huang's ``p_L``).
        scale_by_keep: timm's form (True) or Huang's classic stochastic depth (False).
        p_head: dropout before the classifier.
        flat_image_shape: when given, the input is ``[B, C*H*W]`` and is unflattened to this shape first.
        stem_pool: 2x2 max-pooling after the stem (for 28x28 inputs).

    Input ``[B, C, H, W]`` (or flat, see above), output ``[B, out_features]`` logits.
    """
    depth = len(widths) * blocks_per_stage
    rates = linear_decay(p_last, depth)
    layers: list[nn.Module] = []
    if flat_image_shape is not None:
        layers.append(nn.Unflatten(1, tuple(int(v) for v in flat_image_shape)))
    layers += [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    if stem_pool:
        layers.append(nn.MaxPool2d(2))
    width = widths[0]
    index = 0
    for stage, out_c in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(width, out_c, stride, rates[index], scale_by_keep))
            width = out_c
            index += 1
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p_head), nn.Linear(width, out_features)]
    return nn.Sequential(*layers)
