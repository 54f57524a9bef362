"""Stochastic site types: the `Site` record, the table of known stochastic module classes, and module sites.

A *module site* is a module of a known stochastic type: torch's dropout modules, ``dropwise.models.layers``,
timm / torchvision / Hugging Face transformers drop-path and DropBlock classes recognised by class name and
module path without importing those libraries, or a type the user registered with `register_site_type`.
`module_sites` lists them without running the model (functional sites: ``dropwise.surgery.functional_sites``).
Train / eval / MC semantics of each member: docs/DESIGN.md §2; ``p`` is the DROP probability everywhere.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .module_tools import class_path, named_modules

__all__ = [
    "FOLD_RULES",
    "FOLD_TEXT",
    "SWITCH_ALWAYS",
    "SWITCH_FUNCTIONAL",
    "SWITCH_MODULE",
    "SWITCH_UNKNOWN",
    "Site",
    "SiteType",
    "module_sites",
    "register_site_type",
    "site_type_of",
]

#: How a site is removed by ``dropwise.surgery.fold``: ``delete`` (eval is the identity), ``scale`` (eval multiplies
#: by ``eval_scale``, folded into an adjacent affine op), ``mean_rule`` (DropConnect: plain layer with qW),
#: ``mean_join`` (FractalNet join: deterministic mean), ``freeze`` (deterministic but not affine: kept in
#: eval form), ``pin`` (functional site: its gating module's ``training`` flag is pinned to False),
#: ``none`` (cannot be folded).
FOLD_RULES = ("delete", "scale", "mean_rule", "mean_join", "freeze", "pin", "none")

SWITCH_MODULE = "module.training"
SWITCH_FUNCTIONAL = "parent.training (functional)"
SWITCH_ALWAYS = "always (training=True)"
SWITCH_UNKNOWN = "unknown gate"


@dataclass
class Site:
    """One place where randomness enters at train time.

    Attributes:
        name: qualified module name (``""`` is the root); for a functional site, the module whose forward
            makes the call.
        kind: ``dropout``, ``dropout1d/2d/3d``, ``alpha_dropout``, ``feature_alpha_dropout``,
            ``classic_dropout``, ``embedding_dropout``, ``drop_connect``, ``drop_path``,
            ``stochastic_depth_classic``, ``fractal_join``, ``drop_block``, ``functional_dropout``,
            ``attention_dropout`` or a user-registered kind.
        p: drop probability (DropBlock: the TARGET probability; the current one is in ``details``).
        switch: how it is switched on (see the module docstring).
        foldable: whether ``dropwise.surgery.fold`` removes it exactly.
        fold_rule: one of ``FOLD_RULES`` plus a short explanation.
        module_class: ``module.path.ClassName`` of the site module (functional: of the gating module).
        function: functional sites only, e.g. ``"dropout#0"`` (function name and call ordinal).
        called: whether the module ran during the example forward (``None`` without an example input).
        details: extra attributes (``scale_by_keep``, ``mode``, ``block_size``, ``drop_prob`` ...).
    """

    name: str
    kind: str
    p: float
    switch: str
    foldable: bool
    fold_rule: str
    module_class: str
    function: str | None = None
    called: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique identifier: ``name`` for module sites, ``name:function`` for functional sites."""
        return self.name if self.function is None else f"{self.name}:{self.function}"

    @property
    def rule(self) -> str:
        """The bare fold rule (first word of ``fold_rule``)."""
        return self.fold_rule.split(":", 1)[0].strip()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (for ``dropwise inspect --json`` and package manifests)."""
        out = asdict(self)
        out["key"] = self.key
        return out


PGetter = Callable[[nn.Module], float]
KindGetter = Callable[[nn.Module], str]


@dataclass(frozen=True)
class SiteType:
    """A recognised stochastic module type.

    ``match`` is a class object (subclasses match too) or ``(module_prefix, class_name_pattern)`` matched
    against every class in the module's MRO by name only (so timm / torchvision are never imported).
    """

    match: type | tuple[str, str]
    kind: str | KindGetter
    p: PGetter
    fold: str | Callable[[nn.Module], str] = "delete"
    eval_scale: Callable[[nn.Module], float] | None = None
    details: Callable[[nn.Module], dict[str, Any]] | None = None
    mc_setup: Callable[[nn.Module], None] | None = None
    switch: str = SWITCH_MODULE

    def kind_of(self, module: nn.Module) -> str:
        return self.kind(module) if callable(self.kind) else self.kind

    def fold_of(self, module: nn.Module) -> str:
        return self.fold(module) if callable(self.fold) else self.fold

    def matches(self, cls: type) -> bool:
        if isinstance(self.match, type):
            return cls is self.match
        prefix, pattern = self.match
        mod = getattr(cls, "__module__", "") or ""
        in_pkg = mod == prefix or mod.startswith(prefix + ".")
        return in_pkg and fnmatch.fnmatchcase(cls.__qualname__, pattern)


def _attr(name: str) -> PGetter:
    def get(module: nn.Module) -> float:
        value = getattr(module, name)
        return float(value)

    get.__name__ = f"attr_{name}"
    return get


def _keep(p_attr: str) -> Callable[[nn.Module], float]:
    return lambda m: 1.0 - float(getattr(m, p_attr))


def _pick(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    def get(module: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in names:
            if hasattr(module, n):
                v = getattr(module, n)
                out[n] = v if isinstance(v, bool | int | float | str) or v is None else str(v)
        return out

    return get


def _drop_connect_fold(module: nn.Module) -> str:
    inference = getattr(module, "inference", "mean")
    if inference == "mean" or getattr(module, "activation", None) is None:
        return "mean_rule"
    return "freeze"


def _set_drop_prob_to_target(module: Any) -> None:
    module.drop_prob = float(module.p)


_OURS = "dropwise.models.layers"

_BUILTIN: list[SiteType] = [
    SiteType(nn.Dropout, "dropout", _attr("p")),
    SiteType(nn.Dropout1d, "dropout1d", _attr("p")),
    SiteType(nn.Dropout2d, "dropout2d", _attr("p")),
    SiteType(nn.Dropout3d, "dropout3d", _attr("p")),
    SiteType(nn.AlphaDropout, "alpha_dropout", _attr("p")),
    SiteType(nn.FeatureAlphaDropout, "feature_alpha_dropout", _attr("p")),
    # models.layers (matched by name so that this file does not depend on import order)
    SiteType((_OURS, "ClassicDropout"), "classic_dropout", _attr("p"), "scale", _keep("p")),
    SiteType((_OURS, "EmbeddingDropout"), "embedding_dropout", _attr("p")),
    SiteType(
        (_OURS, "DropConnect*"),
        "drop_connect",
        _attr("p"),
        _drop_connect_fold,
        details=_pick("inference", "per_example", "gaussian_samples"),
    ),
    SiteType(
        (_OURS, "DropPath"),
        lambda m: "drop_path" if m.scale_by_keep else "stochastic_depth_classic",
        _attr("p"),
        lambda m: "delete" if m.scale_by_keep else "scale",
        _keep("p"),
        details=_pick("scale_by_keep"),
    ),
    SiteType((_OURS, "FractalJoin"), "fractal_join", _attr("p"), "mean_join", details=_pick("n_inputs")),
    SiteType(
        (_OURS, "DropBlock2d"),
        "drop_block",
        _attr("p"),
        details=_pick("block_size", "drop_prob"),
        mc_setup=_set_drop_prob_to_target,
    ),
    # timm: DropPath(drop_prob, scale_by_keep) is the identity in eval whatever scale_by_keep says.
    SiteType(("timm", "DropPath"), "drop_path", _attr("drop_prob"), details=_pick("scale_by_keep")),
    SiteType(
        ("timm", "DropBlock*2d"),
        "drop_block",
        _attr("drop_prob"),
        details=_pick("block_size", "gamma_scale", "with_noise", "batchwise", "fast", "couple_channels"),
    ),
    # torchvision.ops: StochasticDepth(p, mode="row"|"batch") and DropBlock2d/3d(p, block_size).
    SiteType(("torchvision", "StochasticDepth"), "drop_path", _attr("p"), details=_pick("mode")),
    SiteType(("torchvision", "DropBlock[23]d"), "drop_block", _attr("p"), details=_pick("block_size")),
    # Hugging Face transformers: ConvNextDropPath, BeitDropPath, SwinDropPath ... (attribute drop_prob).
    SiteType(("transformers", "*DropPath"), "drop_path", _attr("drop_prob")),
]

_USER: list[SiteType] = []


def register_site_type(
    cls_or_qualname: type | str,
    *,
    kind: str,
    p_attr: str = "p",
    fold: str = "delete",
    eval_scale: Callable[[nn.Module], float] | None = None,
    mc_setup: Callable[[nn.Module], None] | None = None,
) -> SiteType:
    """Register a user stochastic layer type so that ``find_sites`` / ``fold`` / ``to_mc`` handle it.

    Args:
        cls_or_qualname: the class, or ``"package.module.ClassName"`` (the class name may be an fnmatch
            pattern; the module part matches that module and its submodules).
        kind: the site kind to report.
        p_attr: attribute holding the drop probability.
        fold: ``"delete"`` (eval is the identity), ``"scale"`` (eval multiplies by ``eval_scale``, default
            ``1 - p``), ``"freeze"`` (deterministic eval form kept) or ``"none"``.
        eval_scale: for ``fold="scale"``: the eval-time factor as a function of the module.
        mc_setup: called on the module by ``to_mc`` after its training flag is set.

    The layer must be stochastic exactly when its ``training`` flag is True. Later registrations win.
    """
    if fold not in ("delete", "scale", "freeze", "none"):
        raise ValueError(f"fold must be one of delete, scale, freeze, none; got {fold!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind must be a non-empty string")
    if isinstance(cls_or_qualname, type):
        if not issubclass(cls_or_qualname, nn.Module):
            raise TypeError(f"{cls_or_qualname!r} is not an nn.Module subclass")
        match: type | tuple[str, str] = cls_or_qualname
    elif isinstance(cls_or_qualname, str) and "." in cls_or_qualname:
        mod, _, name = cls_or_qualname.rpartition(".")
        if not mod or not name:
            raise ValueError(f"expected 'package.module.ClassName', got {cls_or_qualname!r}")
        match = (mod, name)
    else:
        raise ValueError(f"expected a class or 'package.module.ClassName', got {cls_or_qualname!r}")
    scale = eval_scale if eval_scale is not None else (_keep(p_attr) if fold == "scale" else None)
    site_type = SiteType(match, kind, _attr(p_attr), fold, scale, None, mc_setup)
    _USER.insert(0, site_type)
    return site_type


def site_type_of(module: nn.Module) -> SiteType | None:
    """The registered ``SiteType`` of ``module`` (user registrations first, then the built-ins), or None."""
    for cls in type(module).__mro__:
        if cls in (nn.Module, object):
            break
        for site_type in (*_USER, *_BUILTIN):
            if site_type.matches(cls):
                return site_type
    return None


FOLD_TEXT = {
    "delete": "delete: the identity in eval",
    "scale": "scale: eval multiplies by q; fold q into an adjacent affine op",
    "mean_rule": "mean_rule: replace by a plain layer with weight qW (then its activation)",
    "mean_join": "mean_join: replace by the deterministic mean of the inputs",
    "freeze": "freeze: deterministic but not affine in eval; kept in its eval form",
    "none": "none: cannot be folded",
}


def module_sites(model: nn.Module) -> list[Site]:
    """The module sites of ``model`` (no forward pass), in ``named_modules`` order."""
    sites: list[Site] = []
    for name, module in named_modules(model):
        site_type = site_type_of(module)
        if site_type is None:
            continue
        rule = site_type.fold_of(module)
        details = site_type.details(module) if site_type.details else {}
        if site_type.eval_scale is not None and rule == "scale":
            details["eval_scale"] = float(site_type.eval_scale(module))
        sites.append(
            Site(
                name=name,
                kind=site_type.kind_of(module),
                p=float(site_type.p(module)),
                switch=site_type.switch,
                foldable=rule in ("delete", "scale", "mean_rule", "mean_join"),
                fold_rule=FOLD_TEXT.get(rule, rule),
                module_class=class_path(module),
                details=details,
            )
        )
    return sites
