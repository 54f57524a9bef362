"""Module helpers shared by the surgery passes: calling a model, walking it, copying it, freezing a part.

- `call_model`: call a model with a tensor, a tuple of positional args or a dict of keyword args;
- `named_modules`: ``named_modules`` that does not descend into `FrozenEval` wrappers;
- `class_path`: ``module.path.ClassName`` of an object (how sites name their classes);
- `FrozenEval`: a module that always runs in its deterministic eval form, whatever ``train()`` says;
- `set_training`: set every ``training`` flag directly, bypassing overridden ``train()`` methods (an MC model
  keeps its sites on through ``train()``, a `FrozenEval` stays eval); `FrozenEval` interiors are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["FrozenEval", "call_model", "class_path", "named_modules", "set_training"]


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def class_path(obj: object) -> str:
    """``module.path.ClassName`` of ``obj``'s class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


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


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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


def set_training(model: nn.Module, flag: bool) -> None:
    """Set the ``training`` flag of ``model`` and of every submodule outside `FrozenEval` wrappers to ``flag``."""
    for _, module in named_modules(model):
        module.training = flag
