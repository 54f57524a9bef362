"""Reference networks that together use every member of the dropout family (see ``registry.ZOO``)."""

from dropwise.models.zoo.registry import ZOO, ZooSpec, build

__all__ = ["ZOO", "ZooSpec", "build"]
