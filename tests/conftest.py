"""Shared fixtures: a complete model repository of every zoo network, trained in quick mode.

``quick_repository`` trains each reference network for a handful of batches (``quick=True``) and writes it
as a package, once per test session, in a few seconds. Its metrics are meaningless; its packages are real
(safetensors weights, verified manifest) and load with ``dropwise.package.load_package``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dropwise.models.zoo import ZOO


@pytest.fixture(scope="session")
def quick_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding version 1 of every zoo network (quick training)."""
    from dropwise.zoo_training import train_zoo

    repository = tmp_path_factory.mktemp("quick_repository")
    train_zoo(None, repository, quick=True, progress=False)
    return repository


@pytest.fixture(scope="session")
def zoo_names() -> list[str]:
    """Names of every reference network."""
    return list(ZOO)
