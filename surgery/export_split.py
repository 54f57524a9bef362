"""The ``torch.export`` front-end of `dropwise.surgery.split`, for models ``torch.fx`` cannot trace.

Hugging Face transformers 5.x removed torch.fx support, and a root module that gates functional dropout on its
own ``training`` flag cannot be traced with live flags. This front-end captures such models with
``torch.export`` (dynamic batch) in MC mode: every site module and every gating module in train mode,
everything else in eval, so the graph holds every stochastic op (exported in eval mode, attention dropout and
drop-path vanish from the graph). Each stochastic ``aten`` node is attributed to a site through its
``nn_module_stack`` (the innermost site module, else the innermost gating module and the call's ordinal), and
the graph is rewritten so that the training flags are live again:

- the nodes of a module site (``nn.Dropout``'s single ``aten.dropout``, a drop-path's draw-and-scale) become
  one ``call_module`` of the model's own module, under its own name (the MC engine rewrites it as usual);
- a functional ``aten.dropout`` / ``aten.scaled_dot_product_attention`` of a gating module becomes a
  ``call_module`` of a `FunctionalCallSite` (``training`` False: the call's eval form), recorded in
  ``SplitModel.site_modules`` under the site's key.

The rewritten graph is then cut before the first chosen site like the fx graph. Any stochastic node that no
site explains, or a module site whose nodes do not form one single-input, single-output block, makes the
capture fail with a reason (the split then runs the whole model as the tail).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

from .functional_sites import FUNCTIONAL_SPECS
from .module_tools import set_training
from .site_types import SWITCH_FUNCTIONAL, SWITCH_MODULE, Site

__all__ = ["FunctionalCallSite", "capture"]

_aten = torch.ops.aten

#: aten ops that make a random draw, and the torch function whose call they stand for (None: a bare draw).
_RANDOM_OPS: dict[Any, Callable[..., Any] | None] = {
    _aten.dropout.default: torch.dropout,
    _aten.feature_dropout.default: torch.feature_dropout,
    _aten.alpha_dropout.default: torch.alpha_dropout,
    _aten.feature_alpha_dropout.default: torch.feature_alpha_dropout,
    _aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    _aten.native_dropout.default: None,
    _aten.bernoulli.default: None,
    _aten.bernoulli.p: None,
    _aten.bernoulli_.float: None,
    _aten.bernoulli_.Tensor: None,
    _aten.rand.default: None,
    _aten.rand_like.default: None,
    _aten.randn.default: None,
    _aten.randn_like.default: None,
    _aten.randint.default: None,
    _aten.randint.low: None,
    _aten.randint_like.default: None,
    _aten.randperm.default: None,
    _aten.uniform_.default: None,
    _aten.normal_.default: None,
    _aten.multinomial.default: None,
}


class FunctionalCallSite(nn.Module):
    """One functional dropout call of an exported graph, with a live ``training`` flag.

    Train / MC: ``fn(*args, **kwargs)`` as captured (``torch.dropout`` or ``scaled_dot_product_attention``);
    eval: the same call with its flag off (``dropout_p = 0``). Inside the MC engine it is wrapped in a
    ``TrainModeSite`` whose ``KeyedRandom`` computes the call with counter-hash masks.
    """

    def __init__(self, fn: Callable[..., Any], gate: str, function: str) -> None:
        super().__init__()
        self.fn = fn
        self.gate = gate
        self.function = function
        self.spec = FUNCTIONAL_SPECS[fn]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            args, kwargs = self.spec.switched_off(args, kwargs)
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}, function={self.function!r}"


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``(call key, qualified name)`` of the modules running ``node``, outermost first (the root is ``("", "")``).

    The call key tells apart two calls of one module (``"...dropout"`` and ``"...dropout@1"``).
    """
    stack = node.meta.get("nn_module_stack") or {}
    return [("", "")] + [(str(key), str(path)) for key, (path, _cls) in stack.items() if str(path)]


def _export(model: nn.Module, args: tuple[Any, ...], sites: Sequence[Site]) -> fx.GraphModule:
    flags = {name: m.training for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    try:
        set_training(model, False)
        for site in sites:
            if site.switch in (SWITCH_MODULE, SWITCH_FUNCTIONAL):
                modules[site.name].training = True
        dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
        program = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
    finally:
        for name, module in model.named_modules():
            module.training = flags[name]
    gm = program.module()
    assert isinstance(gm, fx.GraphModule)
    return gm


def _block(graph: fx.Graph, call: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output") and call in (k for k, _ in _stack(n)[1:])]


def _replace_block(gm: fx.GraphModule, model: nn.Module, call: str, name: str) -> None:
    """Replace the nodes of one call of module ``name`` with one ``call_module`` of the model's own module."""
    block = _block(gm.graph, call)
    members = set(block)
    inputs = {a for n in block for a in n.all_input_nodes if a not in members}
    tensors = [a for a in inputs if isinstance(a.meta.get("val"), torch.Tensor)]
    outputs = [n for n in block if any(u not in members for u in n.users)]
    if len(tensors) != 1 or len(outputs) != 1:  # sizes read outside the block are recomputed by the module
        raise RuntimeError(
            f"site {name!r} is not one single-tensor-input, single-output block of the exported graph "
            f"({len(tensors)} tensor input(s), {len(outputs)} output(s))"
        )
    if name not in dict(gm.named_modules()) or gm.get_submodule(name) is not model.get_submodule(name):
        gm.add_submodule(name, model.get_submodule(name))
    with gm.graph.inserting_after(outputs[0]):
        node = gm.graph.call_module(name, (tensors[0],))
    node.meta = dict(outputs[0].meta)
    outputs[0].replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    for member in reversed(block):
        gm.graph.erase_node(member)


def capture(
    model: nn.Module, args: tuple[Any, ...], sites: Sequence[Site], chosen: Sequence[Site] | None = None
) -> tuple[fx.GraphModule, dict[str, nn.Module], dict[str, str]]:
    """Export ``model`` in MC mode and rewrite it with live site modules (see the module docstring).

    Only the ``chosen`` sites (default: all) are in train mode while exporting: the others are captured in
    their eval form (an eval ``aten.dropout`` still becomes its live module), so a functional form whose
    draws export as bare ``aten.rand`` nodes does not block a split at another site. Returns the graph module,
    ``site_modules`` (functional site key -> its `FunctionalCallSite`) and the name of the graph's module for
    every site key found in the graph (module sites: their own name).
    """
    gm = _export(model, args, sites if chosen is None else chosen)
    module_names = {s.name for s in sites if s.function is None}
    gates = {s.name for s in sites if s.function is not None and s.switch == SWITCH_FUNCTIONAL}
    by_key = {s.key: s for s in sites}
    targets: dict[str, str] = {}
    site_modules: dict[str, nn.Module] = {}
    ordinals: dict[tuple[str, str], int] = {}
    blocks: dict[str, str] = {}  # call key -> module site name
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RANDOM_OPS:
            continue
        if node.target is _aten.scaled_dot_product_attention.default:
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if not p:
                continue
        stack = _stack(node)
        owner = next(((k, m) for k, m in reversed(stack) if m in module_names), None)
        if owner is not None:
            blocks.setdefault(owner[0], owner[1])
            continue
        gate = next((m for _, m in reversed(stack) if m in gates), None)
        fn = _RANDOM_OPS[node.target]
        if gate is None or fn is None:
            where = stack[-1][1] or "the root module"
            raise RuntimeError(f"a random op ({node.target}) in {where!r} is not a known site")
        spec = FUNCTIONAL_SPECS[fn]
        label_name = "scaled_dot_product_attention" if fn is F.scaled_dot_product_attention else None
        candidates = [k for k in by_key if k.startswith(f"{gate}:") and (label_name is None or label_name in k)]
        ordinal = ordinals.get((gate, spec.kind), 0)
        ordinals[(gate, spec.kind)] = ordinal + 1
        same_kind = [k for k in candidates if by_key[k].kind == spec.kind]
        if ordinal >= len(same_kind):
            raise RuntimeError(f"a random op ({node.target}) in {gate!r} matches no functional site")
        key = same_kind[ordinal]
        call = FunctionalCallSite(fn, gate, str(by_key[key].function))
        name = f"functional_site_{len(site_modules)}"
        gm.add_submodule(name, call)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, node.args, dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        site_modules[key] = call
        targets[key] = name
    for call_key, name in blocks.items():
        _replace_block(gm, model, call_key, name)
        targets[name] = name
    gm.graph.lint()
    gm.recompile()
    return gm, site_modules, targets
