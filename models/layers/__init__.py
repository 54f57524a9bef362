"""The dropout family as PyTorch layers (docs/DESIGN.md §2; ``p`` is the DROP probability, ``q = 1 - p``).

Each file holds one member: a functional form (``training`` and ``generator`` keywords) beside a module
form (stochastic exactly when ``self.training``; ``generator`` stored as ``self.generator``). Channel
dropout on conv maps uses ``torch.nn.Dropout1d/2d/3d`` as they are.
"""

from .classic_dropout import ClassicDropout, classic_dropout
from .cutout import Cutout, cutout
from .drop_block import DropBlock2d, DropBlockSchedule, drop_block2d, drop_block_gamma, drop_block_mask
from .drop_connect import (
    DropConnectConv2d,
    DropConnectLinear,
    drop_connect_conv2d,
    drop_connect_linear,
    gaussian_nodes,
)
from .drop_path import DropPath, drop_path, linear_decay
from .embedding_dropout import EmbeddingDropout, embedding_dropout
from .fractal_join import FractalJoin, fractal_join
from .max_norm import MaxNorm, max_norm_

__all__ = [
    "ClassicDropout",
    "Cutout",
    "DropBlock2d",
    "DropBlockSchedule",
    "DropConnectConv2d",
    "DropConnectLinear",
    "DropPath",
    "EmbeddingDropout",
    "FractalJoin",
    "MaxNorm",
    "classic_dropout",
    "cutout",
    "drop_block2d",
    "drop_block_gamma",
    "drop_block_mask",
    "drop_connect_conv2d",
    "drop_connect_linear",
    "drop_path",
    "embedding_dropout",
    "fractal_join",
    "gaussian_nodes",
    "linear_decay",
    "max_norm_",
]
