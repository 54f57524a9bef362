"""Find the stochastic sites of any ``nn.Module``: every place where randomness enters at train time.

A *site* is either a module of a known stochastic type (``dropwise.surgery.site_types``: torch's dropout modules,
``dropwise.models.layers``, timm / torchvision / transformers drop-path and DropBlock classes, user-registered
types) or a functional call inside some module's ``forward`` (``dropwise.surgery.functional_sites``: ``F.dropout*``,
``torch.dropout``, ``scaled_dot_product_attention`` with ``dropout_p > 0``, the project's own functional forms).
Functional sites are found only when an example input is given: the model is run on a deep copy in train
mode, in eval mode, and in eval mode with only the candidate gating modules in train mode.
Train / eval / MC semantics of each member: docs/DESIGN.md §2; ``p`` is the DROP probability everywhere.

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
import inspect
from typing import Any

import torch
from torch import nn

from .functional_sites import trace_calls
from .module_tools import FrozenEval, call_model, set_training
from .site_types import (
    FOLD_RULES,
    SWITCH_ALWAYS,
    SWITCH_FUNCTIONAL,
    SWITCH_MODULE,
    SWITCH_UNKNOWN,
    Site,
    SiteType,
    module_sites,
    register_site_type,
    site_type_of,
)

__all__ = [
    "FOLD_RULES",
    "SWITCH_ALWAYS",
    "SWITCH_FUNCTIONAL",
    "SWITCH_MODULE",
    "SWITCH_UNKNOWN",
    "FrozenEval",
    "Site",
    "SiteType",
    "call_model",
    "find_sites",
    "forward_reads_training",
    "gating_modules",
    "module_sites",
    "register_site_type",
    "site_records",
    "site_type_of",
]


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
    work = copy.deepcopy(model)
    devices = [example_input.device] if isinstance(example_input, torch.Tensor) else []
    cuda = [d.index or 0 for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        set_training(work, True)  # flags set directly: an MC model's train() would keep its own state
        for module in work.modules():  # batch statistics are not a site (and fail on a batch of one)
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.eval()
        try:
            train_calls, ran = trace_calls(work, example_input, site_names)
            set_training(work, False)
            eval_calls, _ = trace_calls(work, example_input, site_names)
            gates = {c.module for k, c in train_calls.items() if k not in eval_calls}
            _set_flags(work, dict.fromkeys(gates, True))
            gated_calls, _ = trace_calls(work, example_input, site_names)
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
            switch, foldable, rule = SWITCH_FUNCTIONAL, True, "pin: the gating module is pinned to eval"
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
