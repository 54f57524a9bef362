"""Reference networks that together use every member of the dropout family (see ``registry.ZOO``).

``ZOO``, ``ZooSpec`` and ``build`` load the registry on first use (PEP 562), because the registry carries
each network's training recipe (pydantic, the datasets): importing one network's module, such as
``dropwise.models.zoo.mlp``, needs only torch and ``dropwise.models.layers``. That is what lets
``bench/gpu_check.py`` build the networks on a machine with torch alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dropwise.models.zoo.registry import ZOO, ZooSpec, build

__all__ = ["ZOO", "ZooSpec", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dropwise.models.zoo import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
