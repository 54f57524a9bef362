"""The reference networks: name -> how to build and train it (``ZOO``), and ``build(name)``.

Together the networks use every member of the dropout family (docs/CONTRACTS.md, docs/DESIGN.md §2); each
spec lists the members it uses in ``members`` so tests can check the coverage. A network is rebuilt from its
``factory`` string and JSON ``kwargs`` exactly as a model package records them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from dropwise.models.training import CutoutConfig, TrainConfig
from torch import nn


@dataclass(frozen=True)
class ZooSpec:
    """A reference network: factory (``module:function``), JSON kwargs, dataset, task and training recipe."""

    name: str
    factory: str
    kwargs: dict[str, Any]
    dataset: str
    task: Literal["classification", "regression"]
    train: TrainConfig
    description: str
    members: tuple[str, ...] = field(default_factory=tuple)


def _spec(**fields: Any) -> tuple[str, ZooSpec]:
    spec = ZooSpec(**fields)
    return spec.name, spec


ZOO: dict[str, ZooSpec] = dict(
    [
        _spec(
            name="mlp_digits",
            factory="dropwise.models.zoo.mlp:dropout_mlp",
            kwargs={
                "in_features": 64,
                "hidden": [256, 256],
                "out_features": 10,
                "p_input": 0.0,
                "p_hidden": [0.0, 0.5],
            },
            dataset="digits",
            task="classification",
            train=TrainConfig(epochs=60, lr=2e-3, batch_size=64, patience=15, max_norm=3.0, seed=1),
            description=(
                "dropout MLP, dropout 0.5 only before the head (picked by validation MC NLL over 5 seeds), max-norm 3"
            ),
            members=("Dropout", "max_norm"),
        ),
        _spec(
            name="mlp_classic_digits",
            factory="dropwise.models.zoo.mlp:dropout_mlp",
            kwargs={
                "in_features": 64,
                "hidden": [256, 256],
                "out_features": 10,
                "p_input": 0.2,
                "p_hidden": 0.5,
                "dropout": "classic",
            },
            dataset="digits",
            task="classification",
            train=TrainConfig(epochs=60, lr=2e-3, batch_size=64, patience=15, max_norm=3.0, seed=1),
            description=(
                "Srivastava 2014's MLP recipe (input dropout 0.2, hidden 0.5, max-norm 3) with non-inverted "
                "(classic) dropout: eval multiplies by q"
            ),
            members=("ClassicDropout", "max_norm"),
        ),
        _spec(
            name="dropconnect_mlp_digits",
            factory="dropwise.models.zoo.dropconnect:dropconnect_mlp",
            kwargs={"in_features": 64, "hidden": [128, 128], "out_features": 10, "p": 0.5},
            dataset="digits",
            task="classification",
            train=TrainConfig(epochs=40, lr=3e-3, batch_size=64, patience=8, seed=2),
            description="Wan 2013 DropConnect MLP (per-example weight masks, mean-rule inference)",
            members=("DropConnectLinear",),
        ),
        _spec(
            name="dropconnect_cnn_digits",
            factory="dropwise.models.zoo.dropconnect:dropconnect_cnn",
            kwargs={"image_shape": [1, 8, 8], "channels": [16, 32], "out_features": 10, "p": 0.2},
            dataset="digits",
            task="classification",
            train=TrainConfig(epochs=40, lr=2e-3, batch_size=64, patience=10, seed=3),
            description="small CNN of DropConnect convolutions on the 8x8 digits",
            members=("DropConnectConv2d",),
        ),
        _spec(
            name="cnn_mnist",
            factory="dropwise.models.zoo.cnn:dropblock_cnn",
            kwargs={
                "in_channels": 1,
                "channels": [16, 32, 64],
                "image_size": 28,
                "hidden": 128,
                "out_features": 10,
                "p_block": 0.1,
                "block_size": 5,
                "p_spatial": 0.1,
                "p_head": 0.25,
            },
            dataset="mnist",
            task="classification",
            train=TrainConfig(
                epochs=15, lr=3e-3, batch_size=64, patience=5, seed=4, cutout=CutoutConfig(size=8, p=0.5)
            ),
            description=(
                "CNN with BatchNorm, DropBlock (scheduled), spatial dropout, dropout head 0.25 (picked by validation "
                "MC NLL over 2 seeds); Cutout"
            ),
            members=("DropBlock2d", "Dropout2d", "Dropout", "Cutout", "BatchNorm2d"),
        ),
        _spec(
            name="resnet_mnist",
            factory="dropwise.models.zoo.resnet:stochastic_depth_resnet",
            kwargs={
                "in_channels": 1,
                "widths": [24, 48],
                "blocks_per_stage": 2,
                "out_features": 10,
                "p_last": 0.2,
                "scale_by_keep": True,
                "p_head": 0.2,
            },
            dataset="mnist",
            task="classification",
            train=TrainConfig(epochs=20, lr=3e-3, batch_size=64, patience=6, seed=5),
            description="ResNet, stochastic depth (timm DropPath, linear decay), dropout before the head",
            members=("DropPath", "linear_decay", "Dropout", "BatchNorm2d"),
        ),
        _spec(
            name="resnet_classic_digits",
            factory="dropwise.models.zoo.resnet:stochastic_depth_resnet",
            kwargs={
                "in_channels": 1,
                "widths": [16, 32],
                "blocks_per_stage": 2,
                "out_features": 10,
                "p_last": 0.2,
                "scale_by_keep": False,
                "p_head": 0.2,
                "flat_image_shape": [1, 8, 8],
                "stem_pool": False,
            },
            dataset="digits",
            task="classification",
            train=TrainConfig(epochs=40, lr=3e-3, batch_size=64, patience=10, seed=6),
            description="ResNet with Huang's classic stochastic depth (one gate per batch, eval x + q*f(x))",
            members=("DropPath(classic)", "linear_decay", "Dropout", "BatchNorm2d"),
        ),
        _spec(
            name="fractal_mnist",
            factory="dropwise.models.zoo.fractalnet:fractalnet",
            kwargs={
                "in_channels": 1,
                "widths": [16, 32],
                "columns": 3,
                "out_features": 10,
                "p_local": 0.15,
                "global_fraction": 0.5,
            },
            dataset="mnist",
            task="classification",
            train=TrainConfig(epochs=16, lr=3e-3, batch_size=64, patience=5, seed=7),
            description="FractalNet with local and global drop-path (FractalJoin), 3 columns",
            members=("FractalJoin", "BatchNorm2d"),
        ),
        _spec(
            name="embedding_digits_tokens",
            factory="dropwise.models.zoo.embedding:embedding_classifier",
            kwargs={
                "vocab_size": 17,
                "seq_len": 64,
                "embed_dim": 16,
                "hidden": 128,
                "out_features": 10,
                "p_embed": 0.2,
                "p_head": 0.3,
            },
            dataset="digits_tokens",
            task="classification",
            train=TrainConfig(epochs=60, lr=2e-3, batch_size=64, patience=15, seed=8, weight_decay=1e-2),
            description="embedding of pixel-intensity tokens with embedding (SpatialDropout1D) dropout",
            members=("EmbeddingDropout", "Dropout"),
        ),
        _spec(
            name="mlp_diabetes",
            factory="dropwise.models.zoo.mlp:dropout_mlp",
            kwargs={
                "in_features": 10,
                "hidden": [64, 64],
                "out_features": 1,
                "p_input": 0.0,
                "p_hidden": 0.1,
            },
            dataset="diabetes",
            task="regression",
            train=TrainConfig(epochs=300, lr=1e-3, batch_size=32, patience=40, seed=9, weight_decay=1e-2),
            description="regression MLP with dropout: MC dropout gives the predictive mean and std",
            members=("Dropout",),
        ),
    ]
)


def build(name: str) -> nn.Module:
    """Instantiate the zoo network ``name`` (untrained) from its factory string and kwargs.

    Raises:
        KeyError: for an unknown name.
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo network {name!r}; known: {', '.join(ZOO)}")
    spec = ZOO[name]
    module_name, attr = spec.factory.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**spec.kwargs)
