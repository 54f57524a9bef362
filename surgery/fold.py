"""Fold a model for deterministic inference: remove every stochastic site, keep the eval output.

Rules (docs/DESIGN.md §2; ``q = 1 - p``):

- inverted dropout of every flavour, timm-style DropPath, DropBlock, embedding dropout: the identity in eval,
  deleted (replaced by ``nn.Identity``);
- ClassicDropout (Srivastava et al. 2014: train ``m*x``, eval ``q*x``): ``q`` is multiplied into the next
  Linear / Conv weight (``W(qx) + b = (qW)x + b``), or into the following BatchNorm (``gamma <- q gamma``,
  ``running_mean <- running_mean / q``), or into the previous affine op (weight and bias) when only
  positively homogeneous ops (ReLU, max / average pooling, reshapes) lie between;
- classic stochastic depth (Huang et al. 2016: eval ``x + q f(x)``): ``q`` is multiplied into the last affine
  op of the branch ``f``;
- DropConnect (Wan et al. 2013), mean rule ``a((qW)x + b)``: replaced by a plain Linear / Conv2d with weight
  ``qW`` followed by the activation; the Gaussian moment-matching rule is deterministic but not affine, so
  the layer is kept in its eval form (``FrozenEval``);
- FractalNet join (Larsson et al. 2017): replaced by the deterministic mean of its inputs;
- functional and attention dropout gated by ``self.training`` (``F.dropout(h, p, self.training)``, transformers'
  ``dropout_p=p if self.training else 0``, this project's ``drop_path(...)`` called inside a forward): the gating
  module is pinned to eval (`pin_eval`: its ``training`` reads False whatever ``train()`` sets), so the folded
  model is deterministic in train mode too (a fine-tuning loop does not bring the dropout back).

Adjacency is found on a ``torch.fx`` graph traced with site modules as leaves. Where a scale cannot be folded
exactly (no adjacent affine op, shared weights, untraceable model) one multiply is kept (a ``Scale``
module) and the fold report says why. `fold` returns the folded model; `fold_with_report` returns a
`FoldResult` (``.model`` and ``.report``, a `FoldReport`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from dropwise.errors import DropwiseError

from .mc import plain_copy
from .module_tools import FrozenEval, call_model, set_training
from .site_types import SWITCH_FUNCTIONAL, Site
from .sites import find_sites
from .split import trace_with_sites

__all__ = [
    "ActivatedConv2d",
    "ActivatedLinear",
    "EvalPinned",
    "FoldError",
    "FoldReport",
    "FoldResult",
    "MeanJoin",
    "Removed",
    "Scale",
    "fold",
    "fold_with_report",
    "pin_eval",
]


class FoldError(DropwiseError, RuntimeError):
    """The folded model does not reproduce the eval output (a bug: please report it)."""


class Scale(nn.Module):
    """Multiply by a constant: the eval-time scale of a site that could not be folded into a weight."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Removed(nn.Identity):
    """The identity, standing where a deleted site was; keeps its plain attributes (``p``, ``drop_prob``...).

    Some models read a dropout module's ``p`` to drive functional attention dropout
    (transformers' ``dropout=self.dropout.p if self.training else 0.0``); those reads keep working.
    """

    def __init__(self, site: nn.Module) -> None:
        super().__init__()
        self.removed = type(site).__name__
        for key, value in vars(site).items():
            if not key.startswith("_") and key != "training" and isinstance(value, bool | int | float | str):
                setattr(self, key, value)

    def extra_repr(self) -> str:
        return f"removed={self.removed}"


class EvalPinned:
    """Mixin of a module pinned to eval by `pin_eval`: ``training`` reads False whatever is assigned to it.

    ``train()`` / ``eval()`` and direct assignments still run (children follow them) but leave this module in
    eval, so the functional dropout its ``forward`` gates on ``self.training`` never runs.
    """

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, value: bool) -> None:
        del value


_PINNED_CLASSES: dict[type, type] = {}


def pin_eval(module: nn.Module) -> nn.Module:
    """Pin ``module``'s own ``training`` flag to False, in place (its class becomes an `EvalPinned` subclass).

    Parameters, buffers, children and the state-dict keys are unchanged; ``isinstance`` checks against the
    original class still hold. Returns ``module``.
    """
    if isinstance(module, EvalPinned):
        return module
    cls = type(module)
    pinned = _PINNED_CLASSES.get(cls)
    if pinned is None:
        pinned = type(f"EvalPinned{cls.__name__}", (EvalPinned, cls), {"__module__": cls.__module__})
        _PINNED_CLASSES[cls] = pinned
    module.__class__ = pinned
    return module


class MeanJoin(nn.Module):
    """Deterministic FractalNet join: the mean of the inputs, or one column's input when ``column`` is set."""

    def forward(self, inputs: Sequence[Tensor], column: int | None = None) -> Tensor:
        if column is not None:
            return inputs[column]
        return torch.stack(list(inputs)).mean(0)


class ActivatedLinear(nn.Linear):
    """``activation(Linear(x))``: DropConnect's mean rule after folding ``q`` into the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: Any) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.activation is None else self.activation(y)


class ActivatedConv2d(nn.Conv2d):
    """``activation(Conv2d(x))``: DropConnect's mean rule after folding ``q`` into the weight."""

    def __init__(self, activation: Any, **conv: Any) -> None:
        super().__init__(**conv)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.activation is None else self.activation(y)


@dataclass
class FoldEntry:
    """What ``fold`` did with one site."""

    site: str
    kind: str
    action: str  # deleted | folded | replaced | scale kept | frozen | pinned | left (random)
    detail: str


@dataclass
class FoldReport:
    """Per-site actions, the number of multiplies kept, and the check against the eval output."""

    entries: list[FoldEntry] = field(default_factory=list)
    max_abs_diff: float | None = None
    output_scale: float | None = None

    @property
    def scales_kept(self) -> int:
        return sum(e.action == "scale kept" for e in self.entries)

    def add(self, site: Site, action: str, detail: str) -> None:
        self.entries.append(FoldEntry(site.key, site.kind, action, detail))

    def __str__(self) -> str:
        lines = [f"{e.site:<40} {e.kind:<26} {e.action:<11} {e.detail}" for e in self.entries]
        if self.max_abs_diff is not None:
            lines.append(f"max |folded - eval| = {self.max_abs_diff:.3g} (output scale {self.output_scale:.3g})")
        return "\n".join(lines)


@dataclass
class FoldResult:
    """What `fold_with_report` returns: the folded model and the report of what was done to each site."""

    model: nn.Module
    report: FoldReport


_AFFINE_IN = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORM = (nn.modules.batchnorm._BatchNorm,)
_AFFINE_OUT = (*_AFFINE_IN, nn.Embedding, nn.LayerNorm, nn.GroupNorm, *_NORM)
_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    torch.flatten,
    torch.mean,
    torch.sum,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_HOMOGENEOUS_METHODS = {
    "relu",
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "mean",
    "sum",
}


class _Graph:
    """The traced graph of the model being folded, with the facts the fold rules need."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, transparent: set[str]) -> None:
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.transparent = transparent  # site modules that are the identity or a scale in eval
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        owners: Counter[int] = Counter()
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owners[id(param)] += 1
        self.owners = owners

    def node_of(self, name: str) -> fx.Node | None:
        found = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == name]
        return found[0] if len(found) == 1 else None

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def homogeneous(self, node: fx.Node, source: fx.Node) -> bool:
        if not node.args or node.args[0] is not source:
            return False
        if any(source in _flat_nodes(a) for a in node.args[1:]) or any(
            source in _flat_nodes(v) for v in node.kwargs.values()
        ):
            return False
        if node.op == "call_module":
            mod = self.module(node)
            return isinstance(mod, _HOMOGENEOUS_MODULES) or str(node.target) in self.transparent
        if node.op == "call_function":
            return node.target in _HOMOGENEOUS_FUNCTIONS
        if node.op == "call_method":
            return node.target in _HOMOGENEOUS_METHODS
        return False

    def exclusive(self, node: fx.Node, mod: nn.Module) -> str | None:
        """None when ``mod`` is called once and owns its parameters, else why it cannot be changed."""
        if self.calls[node.target] != 1:
            return f"{node.target} is called {self.calls[node.target]} times"
        for param in mod.parameters(recurse=False):
            if self.owners[id(param)] > 1:
                return f"{node.target} shares a parameter with another module"
        return None


def _flat_nodes(a: Any) -> Iterator[fx.Node]:
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, list | tuple):
        for x in a:
            yield from _flat_nodes(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_nodes(x)


@torch.no_grad()
def _scale_into_next(graph: _Graph, node: fx.Node, q: float) -> str:
    """Fold ``q`` forward into the next affine op; returns a description or raises ``ValueError``."""
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise ValueError(f"{cur.name} has {len(users)} users")
        nxt = users[0]
        mod = graph.module(nxt)
        if isinstance(mod, _AFFINE_IN + _NORM) and nxt.args and nxt.args[0] is cur:
            why = graph.exclusive(nxt, mod)
            if why:
                raise ValueError(why)
            if isinstance(mod, _NORM):
                if mod.running_mean is None or mod.running_var is None:
                    raise ValueError(f"{nxt.target} uses batch statistics in eval")
                if q <= 0.0:
                    raise ValueError("q = 0")
                mod.running_mean.div_(q)
                if mod.affine:
                    mod.weight.mul_(q)
                else:
                    mod.running_var.copy_((mod.running_var + mod.eps) / (q * q) - mod.eps)
                return f"into next {type(mod).__name__} {nxt.target} (gamma*q, running_mean/q)"
            mod.weight.mul_(q)
            return f"into next {type(mod).__name__} {nxt.target} (weight*q)"
        if graph.homogeneous(nxt, cur):
            cur = nxt
            continue
        raise ValueError(f"next op {nxt.name} is not affine or positively homogeneous")


@torch.no_grad()
def _scale_into_previous(graph: _Graph, node: fx.Node, q: float) -> str:
    """Fold ``q`` backward into the previous affine op (weight and bias); raises ``ValueError``."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        raise ValueError("site input is not a graph value")
    cur: fx.Node = node.args[0]
    while True:
        if len(cur.users) != 1:
            raise ValueError(f"{cur.name} has {len(cur.users)} users")
        mod = graph.module(cur)
        if isinstance(mod, _AFFINE_OUT):
            why = graph.exclusive(cur, mod)
            if why:
                raise ValueError(why)
            if isinstance(mod, (*_NORM, nn.LayerNorm, nn.GroupNorm)):
                affine = getattr(mod, "affine", getattr(mod, "elementwise_affine", False))
                if not affine or mod.weight is None:
                    raise ValueError(f"{cur.target} has no affine parameters")
            mod.weight.mul_(q)
            bias = getattr(mod, "bias", None)
            if isinstance(bias, Tensor):
                bias.mul_(q)
            return f"into previous {type(mod).__name__} {cur.target} (weight*q, bias*q)"
        if cur.args and isinstance(cur.args[0], fx.Node) and graph.homogeneous(cur, cur.args[0]):
            cur = cur.args[0]
            continue
        raise ValueError(f"previous op {cur.name} is not affine or positively homogeneous")


def _mean_rule_layer(module: Any) -> nn.Module:
    q = 1.0 - float(module.p)
    activation = module.activation
    bias = module.bias is not None
    if isinstance(module.weight, Tensor) and module.weight.dim() == 2:
        layer: Any = ActivatedLinear(module.in_features, module.out_features, bias, activation)
    else:
        layer = ActivatedConv2d(
            activation,
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
        )
    layer = layer.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(module.weight * q)
        if bias:
            layer.bias.copy_(module.bias)
    return layer


def _flat_tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def _eval_output(model: nn.Module, example_input: Any) -> Any:
    flags = {name: m.training for name, m in model.named_modules()}
    try:
        set_training(model, False)  # not model.eval(): an MC model's eval() keeps its sites on
        with torch.no_grad():
            return call_model(model, example_input)
    finally:
        for name, m in model.named_modules():
            m.training = flags[name]


def _check(report: FoldReport, want: Any, got: Any) -> None:
    a, b = _flat_tensors(want), _flat_tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise FoldError("the folded model's output has a different structure")
    diff = max(
        (float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()),
        default=0.0,
    )
    scale = max((float(x.double().abs().max()) for x in a if x.numel() and x.is_floating_point()), default=1.0)
    report.max_abs_diff, report.output_scale = diff, scale
    if diff > 1e-5 * max(scale, 1e-12):
        raise FoldError(f"folded output differs from the eval output by {diff:.3g} (output scale {scale:.3g})")


def fold(model: nn.Module, example_input: Any = None) -> nn.Module:
    """A folded deep copy of ``model`` (the original is untouched), in eval mode, with no stochastic site.

    With ``example_input``, functional sites are found (and their gating modules pinned to eval) and the folded
    output is checked against the original's eval output (max abs difference <= 1e-5 of the output's scale,
    else ``FoldError``). `fold_with_report` also returns what was done to each site.
    """
    return fold_with_report(model, example_input).model


def fold_with_report(model: nn.Module, example_input: Any = None) -> FoldResult:
    """`fold`, returning a `FoldResult`: the folded model and its `FoldReport`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(model).__name__}")
    folded = plain_copy(model)  # an MC model comes back as its own class, in eval
    sites = find_sites(folded, example_input)
    report = FoldReport()
    graph: _Graph | None = None
    trace_error = ""
    if any(s.rule == "scale" and s.function is None for s in sites):
        transparent = {s.name for s in sites if s.function is None and s.rule in ("delete", "scale")}
        try:
            graph = _Graph(trace_with_sites(folded, sites), folded, transparent)
        except Exception as exc:  # fx raises many kinds of errors on untraceable code
            trace_error = f"torch.fx could not trace the model: {type(exc).__name__}"
    replacements: dict[str, nn.Module] = {}
    modules = dict(folded.named_modules())
    pinned: set[str] = set()
    for site in sites:
        if site.function is not None:
            if site.switch == SWITCH_FUNCTIONAL:
                if site.name not in pinned:
                    pinned.add(site.name)
                report.add(site, "pinned", "gating module pinned to eval: off whatever train() says")
            else:
                report.add(site, "left (random)", site.fold_rule)
            continue
        module = modules[site.name]
        rule = site.rule
        if rule == "delete":
            replacements[site.name] = Removed(module)
            report.add(site, "deleted", "identity in eval")
        elif rule == "scale":
            q = float(site.details["eval_scale"])
            replacements[site.name] = _fold_scale(graph, trace_error, site, q, report, module)
        elif rule == "mean_rule":
            replacements[site.name] = _mean_rule_layer(module)
            report.add(site, "replaced", f"plain {type(replacements[site.name]).__name__} with weight q*W")
        elif rule == "mean_join":
            replacements[site.name] = MeanJoin()
            report.add(site, "replaced", "deterministic mean of the inputs")
        elif rule == "freeze":
            replacements[site.name] = FrozenEval(module)
            report.add(site, "frozen", "deterministic eval rule kept (not affine)")
        else:
            report.add(site, "left (random)", site.fold_rule)
    for name, new in replacements.items():
        if name == "":
            raise ValueError("the model itself is a stochastic site; nothing would remain after folding")
        folded.set_submodule(name, new)
    for name in pinned:  # after the replacements: a gate may be the parent of a replaced module site
        pin_eval(folded.get_submodule(name) if name else folded)
    folded.eval()
    if example_input is not None:
        _check(report, _eval_output(model, example_input), _eval_output(folded, example_input))
    return FoldResult(folded, report)


def _fold_scale(
    graph: _Graph | None, trace_error: str, site: Site, q: float, report: FoldReport, module: nn.Module
) -> nn.Module:
    if q == 1.0:
        report.add(site, "deleted", "eval scale is 1")
        return Removed(module)
    if graph is None:
        report.add(site, "scale kept", f"multiply by {q:g} kept: {trace_error}")
        return Scale(q)
    node = graph.node_of(site.name)
    if node is None:
        report.add(site, "scale kept", f"multiply by {q:g} kept: module not called exactly once in the graph")
        return Scale(q)
    order = (_scale_into_previous, _scale_into_next)
    if site.kind != "stochastic_depth_classic":
        order = (_scale_into_next, _scale_into_previous)
    reasons = []
    for attempt in order:
        try:
            detail = attempt(graph, node, q)
        except ValueError as exc:
            reasons.append(str(exc))
            continue
        report.add(site, "folded", f"q={q:g} {detail}")
        return Removed(module)
    report.add(site, "scale kept", f"multiply by {q:g} kept: {'; '.join(reasons)}")
    return Scale(q)
