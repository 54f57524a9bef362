"""Convert a model for Monte-Carlo dropout (Gal & Ghahramani, ICML 2016): sites stochastic at inference.

``to_mc(model)`` returns a deep copy in which every site with ``p > 0`` is in its train form and everything
else is in eval form:

- module sites: only the site module's own ``training`` flag is set (never ``.train()`` recursively), so
  BatchNorm running statistics never change during MC forwards;
- functional and attention dropout gated by ``self.training`` (``F.dropout(x, p, self.training)``,
  ``scaled_dot_product_attention(dropout_p=p if self.training else 0)``): the training flag of the gating
  module alone is set (BatchNorm-like children stay in eval); these need ``example_input`` to be found;
- DropBlock runs at its final (target) drop probability (``drop_prob = p``);
- ClassicDropout and classic stochastic depth run in their train form (``m*x``, one gate per batch).

The result is an `MCModel`: the same network (same modules, parameters and state-dict keys; ``isinstance``
against its own class still holds) whose type adds ``train()`` / ``eval()`` that re-apply this state instead
of undoing it (an MC model is an inference model; fine-tune the original instead), ``mc_sites`` (the
switched sites) and ``head_dropout_added`` (the Linear that got dropout inserted before it, or None).
`plain_copy` gives back a deep copy of the network without the MC type.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

from torch import nn

from dropwise.errors import DropwiseError

from .site_types import SWITCH_FUNCTIONAL, SWITCH_MODULE, Site, site_type_of
from .sites import find_sites, forward_reads_training

__all__ = ["HeadDropoutLinear", "MCModel", "NoStochasticSiteError", "apply_mc_state", "plain_copy", "to_mc"]


class NoStochasticSiteError(DropwiseError, ValueError):
    """The model has no stochastic site with ``p > 0``: MC sampling would return identical samples."""


class HeadDropoutLinear(nn.Linear):
    """``Linear(Dropout(x))``: dropout inserted before a head that had none (state-dict keys unchanged).

    Train / MC: inverted dropout with drop probability ``p`` on the head's input; eval: ``Linear(x)``.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = linear.weight
        self.bias = linear.bias
        self.dropout = nn.Dropout(p)

    def forward(self, x: Any) -> Any:
        return super().forward(self.dropout(x))


def apply_mc_state(model: nn.Module, sites: list[Site]) -> nn.Module:
    """Put ``model`` in MC state: all eval, then each site (or its gating module) in train form."""
    nn.Module.train(model, False)
    modules = dict(model.named_modules())
    for site in sites:
        module = modules[site.name]
        if site.function is None:
            module.training = True
            site_type = site_type_of(module)
            if site_type is not None and site_type.mc_setup is not None:
                site_type.mc_setup(module)
        elif site.switch == SWITCH_FUNCTIONAL:
            module.training = True  # the gating module only, not its children
    return model


class MCModel(nn.Module):
    """The type `to_mc` gives its result: the network's own class with an MC ``train()`` (a mixin).

    ``train()`` / ``eval()`` re-apply the MC state (every module eval except ``mc_sites`` or their gating
    modules), so the model stays an MC model whatever a caller does. Attributes: ``mc_sites`` (the switched
    sites), ``head_dropout_added`` (qualified name of the Linear that got dropout inserted before it, or None),
    ``network_class`` (the original class).
    """

    mc_sites: list[Site]
    head_dropout_added: str | None
    network_class: type[nn.Module]

    def train(self, mode: bool = True) -> MCModel:
        """Re-apply the MC state (``mode`` is ignored: an MC model stays in MC mode)."""
        del mode
        apply_mc_state(self, self.mc_sites)
        return self


_MC_CLASSES: dict[type, type] = {}


def _as_mc(model: nn.Module, sites: list[Site], head: str | None) -> MCModel:
    cls = type(model)
    mc_cls = _MC_CLASSES.get(cls)
    if mc_cls is None:
        mc_cls = type(f"MC{cls.__name__}", (MCModel, cls), {"__module__": cls.__module__, "network_class": cls})
        _MC_CLASSES[cls] = mc_cls
    model.__class__ = mc_cls
    assert isinstance(model, MCModel)
    model.mc_sites = sites
    model.head_dropout_added = head
    model.train()
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``; an `MCModel` comes back as its original class, in eval mode, without MC state."""
    work = copy.deepcopy(model)
    if isinstance(work, MCModel):
        work.__class__ = cast(Any, work.network_class)
        for attr in ("mc_sites", "head_dropout_added"):
            work.__dict__.pop(attr, None)
        work.eval()
    return work


def _add_head_dropout(model: nn.Module, p: float) -> str:
    last = None
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            last = name
    if last is None or last == "":
        raise NoStochasticSiteError("the model has no stochastic site and no nn.Linear to put dropout before")
    linear = model.get_submodule(last)
    assert isinstance(linear, nn.Linear)
    model.set_submodule(last, HeadDropoutLinear(linear, p))
    warnings.warn(
        f"inserted Dropout(p={p}) before {last}: the model was not trained with it; "
        "fine-tune it before trusting its MC uncertainty",
        UserWarning,
        stacklevel=3,
    )
    return last


def to_mc(
    model: nn.Module,
    *,
    example_input: Any = None,
    add_dropout_before_head: float | None = None,
) -> MCModel:
    """A deep copy of ``model`` (the original is untouched) with every site stochastic at inference.

    Args:
        model: any ``nn.Module``.
        example_input: needed to find functional / attention dropout inside ``forward`` (a warning says
            so when some module's forward reads ``self.training`` and no example is given).
        add_dropout_before_head: if set and the model has no site with ``p > 0``, insert inverted dropout
            with this drop probability before its last ``nn.Linear`` (warns: needs fine-tuning).

    Raises:
        NoStochasticSiteError: no site with ``p > 0`` (and no head dropout requested).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_mc expects an nn.Module, got {type(model).__name__}")
    if add_dropout_before_head is not None and not 0.0 < float(add_dropout_before_head) < 1.0:
        raise ValueError(f"add_dropout_before_head must be in (0, 1), got {add_dropout_before_head!r}")
    mc = plain_copy(model)
    sites = find_sites(mc, example_input)
    if example_input is None:
        readers = [n for n, m in mc.named_modules() if site_type_of(m) is None and forward_reads_training(m)]
        if readers:
            warnings.warn(
                f"no example_input: functional dropout inside forward cannot be found; modules whose forward "
                f"reads self.training or calls dropout (e.g. {readers[0]!r}) stay in eval form",
                UserWarning,
                stacklevel=2,
            )
    live = [s for s in sites if s.p > 0.0 and s.switch in (SWITCH_MODULE, SWITCH_FUNCTIONAL)]
    stuck = [s.key for s in sites if s.p > 0.0 and s.switch not in (SWITCH_MODULE, SWITCH_FUNCTIONAL)]
    if stuck:
        warnings.warn(
            f"site(s) {', '.join(stuck)} cannot be switched by a training flag (always random or gated "
            "elsewhere); they are left as they are",
            UserWarning,
            stacklevel=2,
        )
    head: str | None = None
    if not live and add_dropout_before_head is not None:
        head = _add_head_dropout(mc, float(add_dropout_before_head))
        sites = find_sites(mc, example_input)
        live = [s for s in sites if s.name == f"{head}.dropout"]
    if not live:
        zero = [s.key for s in sites if s.p == 0.0]
        extra = f" ({len(zero)} site(s) with p = 0: {', '.join(zero[:5])})" if zero else ""
        hint = "" if example_input is not None else "; pass example_input to find functional dropout"
        raise NoStochasticSiteError(
            f"{type(model).__name__} has no stochastic site with p > 0{extra}{hint}; "
            "use add_dropout_before_head=p (CLI: --add-dropout-before-head P) to insert one "
            "before the last Linear"
        )
    return _as_mc(mc, live, head)
