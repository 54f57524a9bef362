"""Dropout MLPs (Srivastava et al. 2014, "Dropout: a simple way to prevent neural networks from overfitting").

``dropout_mlp``'s defaults are the paper's recipe: dropout on the input (p = 0.2) and on every hidden layer
(p = 0.5), trained with a max-norm constraint on every unit's incoming weights (configured in the training
recipe, not here). ``p_hidden`` may also give one rate per hidden layer (0 omits that dropout), e.g.
``p_input=0, p_hidden=[0, 0.2]`` for dropout only before the classifier, the rate and placement chosen by the
validation NLL of the MC predictive as Gal (2016, "Uncertainty in Deep Learning", §4) recommends.

``dropout="inverted"`` uses ``nn.Dropout`` (train ``m*x/q``, eval ``x``, MC as train); ``dropout="classic"``
uses ``ClassicDropout`` (train ``m*x``, eval ``q*x``, MC as train), the paper's own formulation.
With ``out_features=1`` and a small hidden dropout the same family serves as the regression MLP whose MC-dropout
samples give a predictive mean and std (Gal and Ghahramani 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Literal

from dropwise.models.layers import ClassicDropout
from torch import nn


def _dropout(p: float, kind: Literal["inverted", "classic"]) -> nn.Module:
    if kind == "classic":
        return ClassicDropout(p)
    if kind == "inverted":
        return nn.Dropout(p)
    raise ValueError(f"dropout must be 'inverted' or 'classic', got {kind!r}")


def _probability(p: object, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{what} must be a dropout probability in [0, 1), got {p!r}")
    return float(p)


def hidden_rates(p_hidden: float | Sequence[float], layers: int) -> list[float]:
    """One dropout probability per hidden layer from ``p_hidden``: a float for all, or one rate per layer.

    Raises ``ValueError`` for a rate outside [0, 1) or a sequence whose length is not ``layers``.
    """
    if isinstance(p_hidden, (Real, bool)):
        return [_probability(p_hidden, "p_hidden")] * layers
    if isinstance(p_hidden, (str, bytes)) or not isinstance(p_hidden, Sequence):
        raise ValueError(f"p_hidden must be a float or one float per hidden layer, got {p_hidden!r}")
    if len(p_hidden) != layers:
        raise ValueError(f"p_hidden lists {len(p_hidden)} rates for {layers} hidden layers; give one per layer")
    return [_probability(p, f"p_hidden[{i}]") for i, p in enumerate(p_hidden)]


def dropout_mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    p_input: float = 0.2,
    p_hidden: float | Sequence[float] = 0.5,
    dropout: Literal["inverted", "classic"] = "inverted",
) -> nn.Sequential:
    """MLP ``[dropout(p_input)] -> (Linear -> ReLU -> dropout(p_i)) for each hidden layer i -> Linear``.

    ``p_hidden`` is either one float, the rate after every hidden layer, or a sequence with one rate per
    entry of ``hidden`` (``p_i`` follows hidden layer ``i``). A dropout probability of 0 omits that layer.
    Train: each dropout drops units with its rate; eval: identity (inverted) or ``q*x`` (classic); MC: as train.
    Input ``[B, in_features]`` float, output ``[B, out_features]`` logits (or regression outputs).
    Raises ``ValueError`` for a rate outside [0, 1) or a per-layer list of the wrong length.
    """
    if not hidden:
        raise ValueError("hidden must list at least one layer width")
    p_in = _probability(p_input, "p_input")
    rates = hidden_rates(p_hidden, len(hidden))
    layers: list[nn.Module] = []
    if p_in > 0:
        layers.append(_dropout(p_in, dropout))
    width = in_features
    for h, p in zip(hidden, rates, strict=True):
        layers += [nn.Linear(width, h), nn.ReLU()]
        if p > 0:
            layers.append(_dropout(p, dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
