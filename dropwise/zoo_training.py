"""Training orchestration: train reference networks of the zoo and write each as a model package.

This sits on top of the layers (``models`` trains one network, ``package`` writes it); ``dropwise train`` and
the first start of ``dropwise serve`` call it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dropwise.models.data import load_dataset
from dropwise.models.training import seed_everything, train_model
from dropwise.models.zoo import ZOO, build
from dropwise.package import save_package
from dropwise.surgery.sites import site_records


def train_zoo(
    names: list[str] | None,
    repository: Path,
    quick: bool = False,
    *,
    seed: int | None = None,
    progress: bool = True,
    on_package: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Train the named reference networks (all of ``dropwise.models.zoo.ZOO`` when None) and write one package each.

    Returns the package directories (``<repository>/<name>/<version>``), a new version per call;
    ``on_package`` is called with each directory as soon as it is written.

    Raises:
        KeyError: for a name not in the zoo (message lists the known names).
    """
    selected = list(ZOO) if not names else list(names)
    unknown = [n for n in selected if n not in ZOO]
    if unknown:
        raise KeyError(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(ZOO)}")
    paths = []
    for name in selected:
        spec = ZOO[name]
        config = spec.train if seed is None else spec.train.model_copy(update={"seed": seed})
        dataset = load_dataset(spec.dataset)
        seed_everything(config.seed)
        model = build(name)
        result = train_model(model, dataset, config, quick=quick, progress=progress, desc=name)
        training: dict[str, Any] = {
            **config.model_dump(mode="json"),
            "dataset": dataset.name,
            "split": dataset.split,
            "normalisation": dataset.normalisation,  # raw -> model input as numbers ("preprocess": true)
            "quick": quick,
            "history": result.history,
        }
        path = save_package(
            repository,
            name,
            model,
            task=spec.task,
            input_shape=dataset.input_shape,
            input_dtype=dataset.input_dtype,
            preprocessing=dataset.preprocessing,
            labels=dataset.labels,
            sites=site_records(model),
            architecture={"factory": spec.factory, "kwargs": spec.kwargs},
            training=training,
            metrics=result.metrics,
            target=dataset.target,
        )
        paths.append(path)
        if on_package is not None:
            on_package(path)
    return paths


__all__ = ["train_zoo"]
