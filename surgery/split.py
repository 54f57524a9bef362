"""Split a model at its first stochastic site: a deterministic trunk and a stochastic tail.

Fast MC dropout runs the trunk once and the tail T times (Gal & Ghahramani 2016 need only the layers after
the first dropout to be re-sampled). The split is exact: ``tail(*trunk(x)) == model(x)`` in eval mode and in
MC mode (same RNG draws in the same order: the trunk makes no random draw).

Two graph front-ends (``SplitModel.frontend`` says which one was taken):

- ``"fx"`` (tried first: no export, cheapest): ``torch.fx`` symbolic tracing with a tracer that keeps every
  site module, and every module whose ``forward`` gates functional dropout on ``self.training``, as a leaf: the
  tail's sites are ``call_module`` nodes with the original qualified names (the MC engine rewrites them), and
  training flags stay live instead of being frozen into the graph;
- ``"export"`` (where fx fails: Hugging Face transformers 5.x removed fx support; data-dependent Python; a
  root ``forward`` that gates functional dropout on its own flag): ``torch.export`` in MC mode, the stochastic
  ``aten`` nodes attributed to sites through ``nn_module_stack`` and turned back into live modules
  (``dropwise.surgery.export_split``); functional calls become `FunctionalCallSite` modules listed in
  ``SplitModel.site_modules``.

Every value the tail needs from the trunk is carried across the split point (residual connections that jump
over it included); non-tensor values (shapes, sizes) are recomputed in the tail from carried tensors so that
the trunk returns tensors only. Where neither front-end captures the model, ``captured`` is False, ``reason``
says why and the split falls back to an empty trunk and the whole model as the tail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .export_split import capture
from .module_tools import FrozenEval, call_model
from .site_types import Site
from .sites import find_sites, gating_modules

__all__ = ["RANDOM_FUNCTIONS", "SiteTracer", "SplitModel", "split", "trace_with_sites"]

#: Functions that draw random numbers when they appear as ``call_function`` nodes.
RANDOM_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.rand,
        torch.rand_like,
        torch.randn,
        torch.randn_like,
        torch.randint,
        torch.randint_like,
        torch.randperm,
        torch.bernoulli,
        torch.normal,
        torch.multinomial,
        torch.poisson,
        torch.dropout,
        torch.feature_dropout,
        torch.alpha_dropout,
        torch.feature_alpha_dropout,
        torch.nn.functional.dropout,
        torch.nn.functional.dropout1d,
        torch.nn.functional.dropout2d,
        torch.nn.functional.dropout3d,
        torch.nn.functional.alpha_dropout,
        torch.nn.functional.feature_alpha_dropout,
        torch.nn.functional.scaled_dot_product_attention,
    }
)
_RANDOM_METHODS = frozenset({"bernoulli_", "bernoulli", "uniform_", "normal_", "random_", "exponential_"})


class SiteTracer(fx.Tracer):
    """An fx tracer that keeps the given modules (sites and gating modules) as leaves."""

    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or isinstance(m, FrozenEval):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_with_sites(model: nn.Module, sites: Sequence[Site]) -> fx.GraphModule:
    """Symbolically trace ``model`` keeping site and gating modules as leaves (raises on failure).

    The returned GraphModule shares its submodules (and their parameters and flags) with ``model``.
    """
    modules = dict(model.named_modules())
    names = {s.name for s in sites if s.function is None} | gating_modules(list(sites))
    if "" in names:
        raise RuntimeError(
            "the root module's own forward gates functional dropout on self.training; tracing would freeze "
            "that flag into the graph"
        )
    tracer = SiteTracer(modules[n] for n in names if n in modules)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _WholeModelTrunk(nn.Module):
    """Fallback trunk: passes the inputs through unchanged."""

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return tuple(args)


class _WholeModelTail(nn.Module):
    """Fallback tail: the whole model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


class SplitModel(nn.Module):
    """``forward(x) = tail(*trunk(x))``.

    Attributes:
        trunk: deterministic part; returns a tuple of tensors (the live values at the split point).
        tail: stochastic part; takes those tensors as positional arguments. Its site nodes are
            ``call_module`` nodes named as in the original model.
        captured: whether the graph was captured; False means trunk = identity, tail = whole model.
        reason: why the capture failed (None when captured).
        split_at: name of the first stochastic node (site key or random function), None when not captured.
        carried: names of the trunk values carried into the tail, in argument order.
        frontend: the graph front-end that captured the split: ``"fx"`` (``torch.fx`` symbolic tracing),
            ``"export"`` (``torch.export``), None when not captured.
        site_modules: site key -> the module of the tail through which that site acts, where it is not the
            model's own module of that name (the export front-end's call modules); empty otherwise.
    """

    def __init__(
        self,
        trunk: nn.Module,
        tail: nn.Module,
        *,
        captured: bool,
        reason: str | None,
        split_at: str | None = None,
        carried: Sequence[str] = (),
        frontend: str | None = None,
        site_modules: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.tail = tail
        self.captured = captured
        self.reason = reason
        self.split_at = split_at
        self.carried = list(carried)
        self.frontend = frontend
        self.site_modules = dict(site_modules or {})

    def forward(self, *args: Any) -> Any:
        return self.tail(*self.trunk(*args))


def _is_stochastic(node: fx.Node, names: set[str]) -> str | None:
    if node.op == "call_module" and node.target in names:
        return str(node.target)
    if node.op == "call_function" and node.target in RANDOM_FUNCTIONS:
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and node.target in _RANDOM_METHODS:
        return f".{node.target}()"
    return None


def _runtime_values(gm: fx.GraphModule, args: tuple[Any, ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        _Recorder(gm).run(*args)
    return values


def _build(gm: fx.GraphModule, cut: int, values: dict[str, Any]) -> tuple[fx.GraphModule, fx.GraphModule, list[str]]:
    """Cut ``gm``'s node list at ``cut``: trunk = nodes before, tail = nodes from ``cut`` on."""
    nodes = list(gm.graph.nodes)
    trunk_nodes = nodes[:cut]
    trunk_set = set(trunk_nodes)
    tail_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    carried: list[fx.Node] = []
    # 1. one placeholder per carried tensor, in first-use order
    for n in nodes[cut:]:
        if n.op == "placeholder":
            raise RuntimeError("an input placeholder after the split point")
        for a in n.all_input_nodes:
            if a in trunk_set:
                _collect(a, trunk_set, values, env, tail_graph, carried)
    # 2. the tail's nodes; get_attr and non-tensor trunk values are recomputed on demand
    for n in nodes[cut:]:
        env[n] = tail_graph.node_copy(n, lambda a: _resolve(a, trunk_set, env, tail_graph))
    tail_graph.lint()
    trunk_graph = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {}
    for n in trunk_nodes:
        tenv[n] = trunk_graph.node_copy(n, lambda a: tenv[a])
    trunk_graph.output(tuple(tenv[n] for n in carried))
    trunk_graph.lint()
    trunk = fx.GraphModule(gm, trunk_graph, "Trunk")
    tail = fx.GraphModule(gm, tail_graph, "Tail")
    return trunk, tail, [n.name for n in carried]


def _is_carried(n: fx.Node, values: dict[str, Any]) -> bool:
    return n.op == "placeholder" or (isinstance(values.get(n.name), torch.Tensor) and n.op != "get_attr")


def _collect(
    n: fx.Node,
    trunk_set: set[fx.Node],
    values: dict[str, Any],
    env: dict[fx.Node, fx.Node],
    graph: fx.Graph,
    carried: list[fx.Node],
) -> None:
    """Create tail placeholders for every carried tensor reachable from ``n`` (inputs of recomputed nodes)."""
    if n in env:
        return
    if _is_carried(n, values):
        env[n] = graph.placeholder(f"carried_{n.name}")
        carried.append(n)
        return
    if n.op == "get_attr":
        return
    for a in n.all_input_nodes:
        if a in trunk_set:
            _collect(a, trunk_set, values, env, graph, carried)


def _resolve(a: fx.Node, trunk_set: set[fx.Node], env: dict[fx.Node, fx.Node], graph: fx.Graph) -> fx.Node:
    if a in env:
        return env[a]
    if a not in trunk_set:
        raise RuntimeError(f"node {a.name} used before it is defined")
    # get_attr or a non-tensor value: recompute in the tail from carried tensors
    env[a] = graph.node_copy(a, lambda b: _resolve(b, trunk_set, env, graph))
    return env[a]


def _as_args(example_input: Any) -> tuple[Any, ...]:
    if isinstance(example_input, dict):
        raise TypeError("keyword inputs are not supported by split; pass a tensor or a tuple of tensors")
    if isinstance(example_input, tuple | list):
        return tuple(example_input)
    return (example_input,)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _check(model: nn.Module, candidate: SplitModel, args: tuple[Any, ...]) -> None:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        want = call_model(model, args)
        torch.manual_seed(1234)
        got = candidate(*args)
    if not _same(want, got):
        raise RuntimeError("the captured graph does not reproduce the model on the example input")


def _fallback(model: nn.Module, reason: str) -> SplitModel:
    return SplitModel(_WholeModelTrunk(), _WholeModelTail(model), captured=False, reason=reason)


def split(model: nn.Module, example_input: Any, sites: Sequence[Site | str] | None = None) -> SplitModel:
    """Split ``model`` before its first stochastic site (of ``sites`` when given: names, keys or Sites).

    The trunk and tail share the model's submodules (flags and parameters), so switching the model to eval
    or MC mode switches the split too. The split is checked on ``example_input`` (same seed, same output)
    in the model's current mode; any capture problem falls back to the whole model as the tail.
    Raises ``ValueError`` when the model (or the chosen subset) has no site.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split expects an nn.Module, got {type(model).__name__}")
    try:
        args = _as_args(example_input)
    except TypeError as exc:
        return _fallback(model, str(exc))
    found = find_sites(model, example_input)
    if not found:
        raise ValueError("the model has no stochastic site: nothing to split")
    if sites is None:
        chosen = found
    else:
        wanted = {s.key if isinstance(s, Site) else str(s) for s in sites}
        chosen = [s for s in found if s.key in wanted or s.name in wanted]
        missing = wanted - {s.key for s in chosen} - {s.name for s in chosen}
        if missing:
            raise ValueError(f"unknown site(s): {', '.join(sorted(missing))}")
        if not chosen:
            raise ValueError("no site chosen")
    try:
        gm = trace_with_sites(model, found)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        fx_reason = f"torch.fx could not trace the model ({_first_line(exc)})"
        return _export_split(model, args, found, chosen, fx_reason)
    stochastic = {s.name for s in chosen if s.function is None} | gating_modules(chosen)
    cut = None
    split_at = None
    for i, node in enumerate(gm.graph.nodes):
        label = _is_stochastic(node, stochastic)
        if label is not None:
            cut, split_at = i, label
            break
    if cut is None:
        return _fallback(model, "no stochastic site is reached by the traced graph")
    try:
        values = _runtime_values(gm, args)
        trunk, tail, carried = _build(gm, cut, values)
        candidate = SplitModel(
            trunk, tail, captured=True, reason=None, split_at=split_at, carried=carried, frontend="fx"
        )
        _check(model, candidate, args)
    except Exception as exc:
        return _fallback(model, f"the traced split failed its check ({_first_line(exc)})")
    return candidate


class _OutputTreeCodeGen(_PyTreeCodeGen):
    """Plain positional inputs, outputs rebuilt into the model's own structure (its pytree ``out_spec``)."""

    def gen_fn_def(self, *args: Any, **kwargs: Any) -> str:
        return fx.graph.CodeGen.gen_fn_def(self, *args, **kwargs)

    def process_inputs(self, *args: Any) -> Any:
        return args


def _export_split(
    model: nn.Module, args: tuple[Any, ...], found: Sequence[Site], chosen: Sequence[Site], fx_reason: str
) -> SplitModel:
    """The ``torch.export`` front-end (`dropwise.surgery.export_split`), tried where torch.fx fails."""
    try:
        gm, site_modules, targets = capture(model, args, found, chosen)
    except Exception as exc:  # export raises many kinds of errors on unsupported code
        return _fallback(model, f"{fx_reason}; torch.export could not capture it ({_first_line(exc)})")
    modules = dict(model.named_modules())
    for key, call in site_modules.items():  # a functional call follows its gate's current flag
        call.training = modules[key.rsplit(":", 1)[0]].training
    stochastic = {targets[s.key] for s in chosen if s.key in targets}
    nodes = list(gm.graph.nodes)
    cut = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in stochastic), None)
    if cut is None:
        return _fallback(model, f"{fx_reason}; no chosen site is reached by the exported graph")
    split_at = next(k for k, t in targets.items() if t == nodes[cut].target)
    try:
        values = _runtime_values(gm, args)
        trunk, tail, carried = _build(gm, cut, values)
        codegen = gm.graph._codegen
        out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
        if out_spec is not None:  # the tail returns the model's own output structure
            tail.graph._codegen = _OutputTreeCodeGen(
                _PyTreeInfo([f"carried_{c}" for c in carried], None, out_spec)  # type: ignore[arg-type]
            )
            tail.recompile()
        candidate = SplitModel(
            trunk,
            tail,
            captured=True,
            reason=None,
            split_at=split_at,
            carried=carried,
            frontend="export",
            site_modules=site_modules,
        )
        _check(model, candidate, args)
    except Exception as exc:
        return _fallback(model, f"{fx_reason}; the exported split failed its check ({_first_line(exc)})")
    return candidate
