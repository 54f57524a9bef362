"""Find the stochastic sites of any ``nn.Module``: every place where randomness enters at train time.

A *site* is either a module of a known stochastic type (torch's dropout modules, our ``dropwise.models.layers``,
timm / torchvision / Hugging Face transformers drop-path and DropBlock classes recognised by class name and
module path without importing those libraries, or a type the user registered with ``register_site_type``)
or a functional call inside some module's ``forward`` (``F.dropout*``, ``F.alpha_dropout``,
``F.feature_alpha_dropout``, ``torch.dropout``, ``scaled_dot_product_attention`` with ``dropout_p > 0``).
Functional sites are found only when an example input is given: the model is run once in train mode on a
deep copy under a ``torch.overrides.TorchFunctionMode`` while forward hooks track which module is running.
Semantics of each member (train / eval / MC): ``docs/DESIGN.md`` §2; ``p`` is the DROP
probability everywhere.

Each ``Site`` records how it is switched on:

- ``"module.training"``: the module's own ``training`` flag;
- ``"parent.training (functional)"``: a functional call whose ``training`` / ``dropout_p`` follows the
  ``training`` flag of the module whose forward makes the call (verified by flipping that flag alone);
- ``"always (training=True)"``: a functional call that is random even in eval mode (``F.dropout``'s
  default ``training=True``): a bug in the model or a deliberate MC layer; it cannot be folded;
- ``"unknown gate"``: random in train mode, not in eval, but not controlled by the enclosing module alone.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "FOLD_RULES",
    "FrozenEval",
    "Site",
    "SiteType",
    "call_model",
    "find_sites",
    "module_sites",
    "plain_copy",
    "register_site_type",
    "site_records",
    "site_type_of",
]

#: How a site is removed by ``dropwise.surgery.fold``: ``delete`` (eval is the identity), ``scale`` (eval multiplies
#: by ``eval_scale``, folded into an adjacent affine op), ``mean_rule`` (DropConnect: plain layer with qW),
#: ``mean_join`` (FractalNet join: deterministic mean), ``freeze`` (deterministic but not affine: kept in
#: eval form), ``none`` (cannot be folded).
FOLD_RULES = ("delete", "scale", "mean_rule", "mean_join", "freeze", "none")

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


def _set_drop_prob_to_target(module: nn.Module) -> None:
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


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


_FOLD_TEXT = {
    "delete": "delete: the identity in eval",
    "scale": "scale: eval multiplies by q; fold q into an adjacent affine op",
    "mean_rule": "mean_rule: replace by a plain layer with weight qW (then its activation)",
    "mean_join": "mean_join: replace by the deterministic mean of the inputs",
    "freeze": "freeze: deterministic but not affine in eval; kept in its eval form",
    "none": "none: cannot be folded",
}


class FrozenEval(nn.Module):
    """Holds a module that must always run in its (deterministic) eval form; ``train()`` keeps it eval.

    Used by ``dropwise.surgery.fold`` for sites whose eval rule is deterministic but not affine (DropConnect with
    Gaussian moment matching). ``find_sites`` does not look inside it.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval()

    def train(self, mode: bool = True) -> FrozenEval:
        self.training = mode
        self.module.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not descend into ``FrozenEval`` wrappers."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, FrozenEval):
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def module_sites(model: nn.Module) -> list[Site]:
    """The module sites of ``model`` (no forward pass), in ``named_modules`` order."""
    sites: list[Site] = []
    for name, module in _named_modules(model):
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
                fold_rule=_FOLD_TEXT.get(rule, rule),
                module_class=_class_path(module),
                details=details,
            )
        )
    return sites


_MC_ATTRIBUTES = ("train", "mc_sites", "head_dropout_added")


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without the MC state that ``dropwise.surgery.mc.to_mc`` installs (its sticky ``train()``), so that
    ``train()`` / ``eval()`` on the copy mean what they say."""
    work = copy.deepcopy(model)
    for module in work.modules():
        for attr in _MC_ATTRIBUTES:
            module.__dict__.pop(attr, None)
    return work


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


# ---------------------------------------------------------------------------------------------------------
# functional sites


@dataclass(frozen=True)
class _FnSpec:
    name: str
    kind: str
    p_index: int
    p_name: str
    p_default: float
    training_index: int | None  # None: random exactly when p > 0 (scaled_dot_product_attention)
    training_name: str
    training_default: bool


def _spec_table() -> dict[Any, _FnSpec]:
    fd = "functional_dropout"
    table = {
        F.dropout: _FnSpec("dropout", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout1d: _FnSpec("dropout1d", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout2d: _FnSpec("dropout2d", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout3d: _FnSpec("dropout3d", fd, 1, "p", 0.5, 2, "training", True),
        F.alpha_dropout: _FnSpec("alpha_dropout", fd, 1, "p", 0.5, 2, "training", False),
        F.feature_alpha_dropout: _FnSpec("feature_alpha_dropout", fd, 1, "p", 0.5, 2, "training", False),
        torch.dropout: _FnSpec("torch.dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.feature_dropout: _FnSpec("torch.feature_dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.alpha_dropout: _FnSpec("torch.alpha_dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.feature_alpha_dropout: _FnSpec("torch.feature_alpha_dropout", fd, 1, "p", 0.5, 2, "train", True),
        F.scaled_dot_product_attention: _FnSpec(
            "scaled_dot_product_attention", "attention_dropout", 4, "dropout_p", 0.0, None, "", False
        ),
    }
    return table


_FUNCTIONS = _spec_table()


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


@dataclass
class _Call:
    module: str
    module_class: str
    function: str
    kind: str
    p: float


class _Recorder(TorchFunctionMode):
    """Records random functional calls made while some module's forward runs."""

    def __init__(self, stack: list[tuple[str, nn.Module, dict[str, int], bool]]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: dict[str, _Call] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        spec = _FUNCTIONS.get(func)
        if spec is not None and self.stack and not any(frame[3] for frame in self.stack):
            p = float(_arg(args, kwargs, spec.p_index, spec.p_name, spec.p_default))
            if spec.training_index is None:
                active = p > 0.0
            else:
                active = bool(_arg(args, kwargs, spec.training_index, spec.training_name, spec.training_default))
            if active:
                name, module, counters, _ = self.stack[-1]
                ordinal = counters.get(spec.name, 0)
                counters[spec.name] = ordinal + 1
                function = f"{spec.name}#{ordinal}"
                self.calls.setdefault(f"{name}:{function}", _Call(name, _class_path(module), function, spec.kind, p))
        return func(*args, **kwargs)


def _trace_calls(model: nn.Module, example_input: Any, site_names: set[str]) -> tuple[dict[str, _Call], set[str]]:
    """Run ``model`` once; return the active random functional calls and the names of modules that ran."""
    stack: list[tuple[str, nn.Module, dict[str, int], bool]] = []
    ran: set[str] = set()
    handles = []

    def pre(name: str, is_site: bool) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any) -> None:
            stack.append((name, module, {}, is_site))
            ran.add(name)

        return hook

    def post(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    for name, module in _named_modules(model):
        handles.append(module.register_forward_pre_hook(pre(name, name in site_names)))
        handles.append(module.register_forward_hook(post, always_call=True))
    recorder = _Recorder(stack)
    try:
        with torch.no_grad(), recorder:
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return recorder.calls, ran


def _set_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    modules = dict(model.named_modules())
    for name, flag in flags.items():
        modules[name].training = flag


def find_sites(model: nn.Module, example_input: Any = None) -> list[Site]:
    """Every stochastic site of ``model``: module sites, plus functional sites given ``example_input``.

    The model, its parameters, buffers (BatchNorm statistics), training flags and the global RNG state are
    left unchanged: the example forwards run on a deep copy inside ``torch.random.fork_rng``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_sites expects an nn.Module, got {type(model).__name__}")
    sites = module_sites(model)
    if example_input is None:
        return sites
    site_names = {s.name for s in sites}
    work = plain_copy(model)
    devices = [example_input.device] if isinstance(example_input, torch.Tensor) else []
    cuda = [d.index or 0 for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        work.train()
        for module in work.modules():  # batch statistics are not a site (and fail on a batch of one)
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.eval()
        try:
            train_calls, ran = _trace_calls(work, example_input, site_names)
            work.eval()
            eval_calls, _ = _trace_calls(work, example_input, site_names)
            gates = {c.module for k, c in train_calls.items() if k not in eval_calls}
            _set_flags(work, dict.fromkeys(gates, True))
            gated_calls, _ = _trace_calls(work, example_input, site_names)
        except Exception as exc:
            raise ValueError(
                f"find_sites: the example forward of {type(model).__name__} failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); check the example input"
            ) from exc
    for site in sites:
        site.called = site.name in ran
    for key, call in train_calls.items():
        if key in eval_calls:
            switch, foldable, rule = SWITCH_ALWAYS, False, "none: random even in eval mode"
        elif key in gated_calls:
            switch, foldable, rule = SWITCH_FUNCTIONAL, True, "delete: off in eval (gated by self.training)"
        else:
            switch, foldable, rule = SWITCH_UNKNOWN, False, "none: gate not found"
        sites.append(
            Site(
                name=call.module,
                kind=call.kind,
                p=call.p,
                switch=switch,
                foldable=foldable,
                fold_rule=rule,
                module_class=call.module_class,
                function=call.function,
                called=True,
            )
        )
    return sites


def gating_modules(sites: list[Site]) -> set[str]:
    """Names of modules whose ``training`` flag gates a functional site."""
    return {s.name for s in sites if s.function is not None and s.switch == SWITCH_FUNCTIONAL}


def forward_reads_training(module: nn.Module) -> bool:
    """Heuristic: does the class's ``forward`` source mention ``self.training`` or a dropout call?"""
    if type(module).__module__.startswith("torch."):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source or "dropout(" in source


def site_records(model: nn.Module, example_input: Any = None) -> list[dict[str, Any]]:
    """``find_sites`` as JSON-able records, the form a model package's manifest stores."""
    return [site.to_dict() for site in find_sites(model, example_input)]
