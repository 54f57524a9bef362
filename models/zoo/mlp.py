"""Dropout MLPs (Srivastava et al. 2014, "Dropout: a simple way to prevent neural networks from overfitting").

``dropout_mlp`` is the paper's recipe: dropout on the input (p = 0.2) and on every hidden layer (p = 0.5),
trained with a max-norm constraint on every unit's incoming weights (configured in the training recipe, not
here). ``dropout="inverted"`` uses ``nn.Dropout`` (train ``m*x/q``, eval ``x``, MC as train);
``dropout="classic"`` uses ``ClassicDropout`` (train ``m*x``, eval ``q*x``, MC as train), the paper's own
formulation. With ``out_features=1`` and a small hidden dropout the same family serves as the regression MLP
whose MC-dropout samples give a predictive mean and std (Gal and Ghahramani 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from dropwise.models.layers import ClassicDropout
from torch import nn


def _dropout(p: float, kind: Literal["inverted", "classic"]) -> nn.Module:
    if kind == "classic":
        return ClassicDropout(p)
    if kind == "inverted":
        return nn.Dropout(p)
    raise ValueError(f"dropout must be 'inverted' or 'classic', got {kind!r}")


def dropout_mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    p_input: float = 0.2,
    p_hidden: float = 0.5,
    dropout: Literal["inverted", "classic"] = "inverted",
) -> nn.Sequential:
    """MLP ``[dropout(p_input)] -> (Linear -> ReLU -> dropout(p_hidden)) x len(hidden) -> Linear``.

    Input ``[B, in_features]`` float, output ``[B, out_features]`` logits (or regression outputs).
    A dropout probability of 0 omits that layer.
    """
    if not hidden:
        raise ValueError("hidden must list at least one layer width")
    layers: list[nn.Module] = []
    if p_input > 0:
        layers.append(_dropout(p_input, dropout))
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if p_hidden > 0:
            layers.append(_dropout(p_hidden, dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
