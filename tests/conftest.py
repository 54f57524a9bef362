"""Shared fixtures: a complete model repository of every zoo network, trained in quick mode.

``quick_repository`` trains each reference network for a handful of batches (``quick=True``) and writes it
as a package, once per test session, in a few seconds. Its metrics are meaningless; its packages are real
(safetensors weights, verified manifest) and load with ``dropwise.package.load_package``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
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


#: statistical bounds in the tests are this many standard deviations of the statistic under a correct implementation
SIGMAS = 5.0


def _assert_binomial(count: int, n: int, prob: float) -> None:
    """``count`` successes in ``n`` trials is within ``SIGMAS`` sigma of Binomial(n, prob)."""
    sigma = math.sqrt(n * prob * (1.0 - prob))
    assert abs(count - n * prob) <= SIGMAS * sigma + 1e-9, (count, n * prob, sigma)


@pytest.fixture(scope="session")
def assert_binomial() -> Callable[[int, int, float], None]:
    """The binomial check: a count of successes lies within 5 sigma of Binomial(n, prob)."""
    return _assert_binomial


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    loaded 2-core machine more threads make small convolutions ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
