"""Functional stochastic sites: random calls made inside some module's ``forward``, found by running it.

A functional site is a call such as ``F.dropout(h, p, training=self.training)``,
``scaled_dot_product_attention(..., dropout_p=p if self.training else 0.0)`` (attention dropout, as in Hugging
Face transformers) or one of this project's own functional forms (``dropwise.models.layers``: `drop_path`,
`classic_dropout`, `embedding_dropout`, `drop_block2d`, `drop_connect_linear`, `drop_connect_conv2d`,
`fractal_join`; they are visible to ``TorchFunctionMode`` like ``F.dropout``). They are found by running the
model under a ``torch.overrides.TorchFunctionMode`` (`Recorder`) while forward hooks track which module is
running; `FUNCTIONAL_SPECS` says, per function, where its drop probability and training flag are.

The MC engine intercepts the same calls (``dropwise.surgery.keyed_sites.KeyedRandom``) and draws their masks from the
counter hash, so a seeded request reproduces row by row. Train: the call drops; eval: the gating module's
``training`` flag turns it off; MC: the gating module alone is put in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from dropwise.models.layers import (
    classic_dropout,
    drop_block2d,
    drop_connect_conv2d,
    drop_connect_linear,
    drop_path,
    embedding_dropout,
    fractal_join,
)
from torch import nn
from torch.overrides import TorchFunctionMode

from .module_tools import call_model, class_path, named_modules

__all__ = ["FUNCTIONAL_SPECS", "FunctionalCall", "FunctionalSpec", "Recorder", "trace_calls"]


@dataclass(frozen=True)
class FunctionalSpec:
    """Where a random function keeps its drop probability and its training flag.

    ``flag_name`` None: no flag, random exactly when ``p > 0`` (``scaled_dot_product_attention``'s
    ``dropout_p``). ``flag_index`` None: the flag is keyword-only. ``project``: a ``dropwise.models.layers``
    functional form (its undecorated body is ``func.__wrapped__``).
    """

    name: str
    kind: str
    p_index: int
    p_name: str
    p_default: float
    flag_index: int | None
    flag_name: str | None
    flag_default: bool
    project: bool = False

    def p(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        """The call's drop probability."""
        return float(_arg(args, kwargs, self.p_index, self.p_name, self.p_default))

    def active(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the call draws random numbers (its flag is on and ``p > 0``)."""
        if self.p(args, kwargs) <= 0.0:
            return False
        if self.flag_name is None:
            return True
        return bool(_arg(args, kwargs, self.flag_index, self.flag_name, self.flag_default))

    def switched_off(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The same call in its eval form (flag False, or ``dropout_p = 0``)."""
        index, name, value = (
            (self.p_index, self.p_name, 0.0) if self.flag_name is None else (self.flag_index, self.flag_name, False)
        )
        args, kwargs = tuple(args), dict(kwargs)
        if index is not None and len(args) > index:
            args = (*args[:index], value, *args[index + 1 :])
        else:
            kwargs[name] = value
        return args, kwargs


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and len(args) > index else default


def _specs() -> dict[Callable[..., Any], FunctionalSpec]:
    fd = "functional_dropout"
    return {
        F.dropout: FunctionalSpec("dropout", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout1d: FunctionalSpec("dropout1d", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout2d: FunctionalSpec("dropout2d", fd, 1, "p", 0.5, 2, "training", True),
        F.dropout3d: FunctionalSpec("dropout3d", fd, 1, "p", 0.5, 2, "training", True),
        F.alpha_dropout: FunctionalSpec("alpha_dropout", fd, 1, "p", 0.5, 2, "training", False),
        F.feature_alpha_dropout: FunctionalSpec("feature_alpha_dropout", fd, 1, "p", 0.5, 2, "training", False),
        torch.dropout: FunctionalSpec("torch.dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.feature_dropout: FunctionalSpec("torch.feature_dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.alpha_dropout: FunctionalSpec("torch.alpha_dropout", fd, 1, "p", 0.5, 2, "train", True),
        torch.feature_alpha_dropout: FunctionalSpec("torch.feature_alpha_dropout", fd, 1, "p", 0.5, 2, "train", True),
        F.scaled_dot_product_attention: FunctionalSpec(
            "scaled_dot_product_attention", "attention_dropout", 4, "dropout_p", 0.0, None, None, False
        ),
        # the project's own functional forms (keyword-only ``training``)
        classic_dropout: FunctionalSpec(
            "classic_dropout", "classic_dropout", 1, "p", 0.5, None, "training", False, True
        ),
        embedding_dropout: FunctionalSpec(
            "embedding_dropout", "embedding_dropout", 1, "p", 0.5, None, "training", False, True
        ),
        drop_path: FunctionalSpec("drop_path", "drop_path", 1, "p", 0.0, None, "training", False, True),
        drop_block2d: FunctionalSpec("drop_block2d", "drop_block", 1, "p", 0.1, None, "training", False, True),
        drop_connect_linear: FunctionalSpec(
            "drop_connect_linear", "drop_connect", 3, "p", 0.5, None, "training", False, True
        ),
        drop_connect_conv2d: FunctionalSpec(
            "drop_connect_conv2d", "drop_connect", 7, "p", 0.5, None, "training", False, True
        ),
        fractal_join: FunctionalSpec("fractal_join", "fractal_join", 1, "p", 0.15, None, "training", False, True),
    }


#: Random functions recognised as functional sites, by function object.
FUNCTIONAL_SPECS: dict[Callable[..., Any], FunctionalSpec] = _specs()


@dataclass
class FunctionalCall:
    """One active random call seen by the `Recorder`: the module running it, the function and its ``p``."""

    module: str
    module_class: str
    function: str
    kind: str
    p: float


Frame = tuple[str, nn.Module, dict[str, int], bool]


class Recorder(TorchFunctionMode):
    """Records active random functional calls made while some module's forward runs (not inside a site module).

    Calls are labelled ``"<function>#<ordinal>"``, the ordinal counting that function's active calls within
    one forward of the innermost running module.
    """

    def __init__(self, stack: list[Frame], events: list[str] | None = None) -> None:
        super().__init__()
        self.stack = stack
        self.calls: dict[str, FunctionalCall] = {}
        self.events = events

    def _recordable(self, spec: FunctionalSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        inside_site = any(frame[3] for frame in self.stack)
        return bool(self.stack) and not inside_site and spec.active(args, kwargs)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        spec = FUNCTIONAL_SPECS.get(func)
        if spec is not None and self._recordable(spec, args, kwargs):
            name, module, counters, _ = self.stack[-1]
            ordinal = counters.get(spec.name, 0)
            counters[spec.name] = ordinal + 1
            function = f"{spec.name}#{ordinal}"
            if self.events is not None:
                self.events.append(f"{name}:{function}")
            self.calls.setdefault(
                f"{name}:{function}",
                FunctionalCall(name, class_path(module), function, spec.kind, spec.p(args, kwargs)),
            )
        return func(*args, **kwargs)


def trace_calls(
    model: nn.Module, example_input: Any, site_names: set[str], events: list[str] | None = None
) -> tuple[dict[str, FunctionalCall], set[str]]:
    """Run ``model`` once; return the active random functional calls (by key) and the modules that ran.

    Calls made inside the modules named in ``site_names`` (module sites) are not recorded. ``events``, when
    given, receives in execution order the name of each module site as it starts and each call's key.
    """
    stack: list[Frame] = []
    ran: set[str] = set()
    handles = []

    def pre(name: str, is_site: bool) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any) -> None:
            stack.append((name, module, {}, is_site))
            ran.add(name)
            if events is not None and is_site:
                events.append(name)

        return hook

    def post(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    for name, module in named_modules(model):
        handles.append(module.register_forward_pre_hook(pre(name, name in site_names)))
        handles.append(module.register_forward_hook(post, always_call=True))
    recorder = Recorder(stack, events)
    try:
        with torch.no_grad(), recorder:
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return recorder.calls, ran
