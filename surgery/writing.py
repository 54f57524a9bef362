"""Write a resolved model source as a model package (what ``dropwise fold | mc | convert`` produce).

The package's weights and architecture always describe the SOURCE network (``ModelSource.base``), so anything
that rebuilds it gets a correct network; a rewrite is recorded as a step in the manifest's ``surgery`` list
(``"fold"``, ``"mc"``, ``"mc:head_dropout=0.3"``, ``"recalibrate_bn"``), which
``dropwise.surgery.sources.apply_surgery`` replays exactly (the rewrites are deterministic functions of the
weights). ``sites`` lists the sites of the model as rewritten, found on a seeded example of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dropwise.package import save_package, validate_name
from dropwise.surgery.sites import site_records
from dropwise.surgery.sources import ModelSource, SourceError
from torch import nn


def save_source(
    source: ModelSource,
    repository: Path,
    name: str | None = None,
    *,
    steps: Sequence[str] = (),
    rewritten: nn.Module | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``source.base`` as a new package version with ``steps`` appended to its surgery; returns the
    version directory.

    Args:
        source: the resolved source (its inputs must be known).
        repository: the repository to write into.
        name: the package name (default: the source's).
        steps: surgery steps applied on top of the source's own.
        rewritten: the model after ``steps`` (its sites are recorded; default ``source.model``).
        training: entries added to the manifest's ``training`` record.

    Raises:
        SourceError: unknown inputs or architecture; PackageError: invalid name, package cannot be written.
    """
    if source.architecture is None:
        raise SourceError("the source has no architecture record; cannot write a package")
    if not source.inputs:
        raise SourceError("the input shape is unknown: pass --input-shape (without the batch dimension)")
    package_name = name or source.name or "model"
    record = dict(source.training)
    if source.dataset:
        record["dataset"] = source.dataset
    record.update(training or {})
    validate_name(package_name)
    return save_package(
        repository,
        package_name,
        source.base,
        task=source.task,  # type: ignore[arg-type]
        inputs=source.inputs,
        architecture=source.architecture,
        labels=source.labels,
        sites=site_records(rewritten if rewritten is not None else source.model, source.example()),
        surgery=[*source.surgery, *steps],
        training=record,
        metrics=source.metrics,
        target=source.target,
    )
