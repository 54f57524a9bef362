"""Rebuilding a network from its manifest's ``module:factory`` reference, behind an allow-list.

Importing a module named by a manifest is code execution, so the module must lie under an allow-listed
prefix (``dropwise.models.`` by default); callers opt in to their own modules with ``allow_modules=``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dropwise.package.manifest import FACTORY_PATTERN, Architecture, PackageError
from torch import nn

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = ("dropwise.models.",)


def _module_allowed(module: str, allowed: Sequence[str]) -> bool:
    for prefix in allowed:
        base = prefix.rstrip(".")
        if base and (module == base or module.startswith(base + ".")):
            return True
    return False


def resolve_factory(factory: str, allow_modules: Sequence[str] | None = None) -> Callable[..., nn.Module]:
    """Import ``module:function`` and return the function, only for allow-listed modules.

    Args:
        factory: ``"package.module:function"``.
        allow_modules: module prefixes that may be imported (default ``("dropwise.models.",)``). Pass your own
            prefixes to opt in to user modules; importing a module runs its code.

    Raises:
        PackageError: malformed reference, module outside the allow-list, import failure, or not callable.
    """
    if not isinstance(factory, str) or not FACTORY_PATTERN.fullmatch(factory):
        raise PackageError(f"invalid factory reference {factory!r}: expected 'package.module:function'")
    module_name, attr = factory.split(":")
    allowed = DEFAULT_ALLOWED_MODULES if allow_modules is None else tuple(allow_modules)
    if not _module_allowed(module_name, allowed):
        raise PackageError(
            f"factory module {module_name!r} is not in the allow-list {list(allowed)}; importing it would "
            "run its code: pass allow_modules=[...] (CLI: --allow-module) to trust it"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PackageError(f"cannot import factory module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise PackageError(f"factory {factory!r} does not name a callable")
    return fn


def build_from_architecture(
    architecture: Architecture | Mapping[str, Any], allow_modules: Sequence[str] | None = None
) -> nn.Module:
    """Rebuild a network from its architecture record (factory + kwargs), with the factory allow-list."""
    arch = architecture if isinstance(architecture, Architecture) else Architecture.model_validate(architecture)
    fn = resolve_factory(arch.factory, allow_modules)
    model = fn(**arch.kwargs)
    if not isinstance(model, nn.Module):
        raise PackageError(f"factory {arch.factory!r} returned {type(model).__name__}, not an nn.Module")
    return model
