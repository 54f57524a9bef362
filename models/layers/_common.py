"""Small checks and random draws shared by the dropout-family layers (not a public API)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

_P = ParamSpec("_P")
_R = TypeVar("_R")


def torch_function_visible(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Make a functional form visible to ``torch.overrides.TorchFunctionMode``, as ``F.dropout`` is.

    When a mode (or a tensor subclass) is active, the call is handed to ``handle_torch_function`` with the
    public function as ``func``: ``dropwise.surgery`` finds such calls inside a module's ``forward`` as
    stochastic sites and keys their draws in the MC engine. The undecorated function is ``__wrapped__``.
    Otherwise the call costs one ``has_torch_function`` check.
    """

    @functools.wraps(fn)
    def visible(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        tensors = tuple(_tensor_args(args))
        if tensors and has_torch_function(tensors):
            return handle_torch_function(visible, tensors, *args, **kwargs)
        return fn(*args, **kwargs)

    return visible


def _tensor_args(args: tuple[object, ...]) -> list[Tensor]:
    """Tensors among ``args``, one level into lists and tuples (``fractal_join`` takes a sequence)."""
    out: list[Tensor] = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, list | tuple):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


def check_probability(p: float, name: str = "p") -> float:
    """Return ``p`` as a float after checking that it is a number in ``[0, 1]``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    value = float(p)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a DROP probability), got {p}")
    return value


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raise a clear error when ``generator`` lives on another device type than the tensor it drives."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device.type!r} but the tensor is on {device.type!r}; "
            "create the generator with torch.Generator(device=tensor.device)"
        )


def bernoulli_mask(shape: Sequence[int], keep: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A {0, 1} mask of ``shape`` with ``P(1) = keep``, in the dtype and on the device of ``like``.

    Drawn as ``uniform < keep`` in place: on the CPU this is about 3x faster than ``Tensor.bernoulli_(keep)``
    (torch 2.13) and gives the same distribution.
    """
    check_generator(generator, like.device)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    if generator is None:  # rand's generator overload takes no symbolic sizes (torch.export, dynamic batch)
        return torch.rand(tuple(shape), dtype=dtype, device=like.device).lt_(keep)
    return torch.rand(tuple(shape), dtype=dtype, device=like.device, generator=generator).lt_(keep)
