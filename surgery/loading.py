"""Resolve the MODEL argument of ``dropwise inspect | fold | mc`` into a model, and write rewritten packages.

MODEL is one of:

- a package directory (a version directory with ``manifest.json``, or a model directory: latest version),
  or a repository together with ``--name`` (``dropwise.package.load_package``: sha256-verified, safetensors,
  never unpickles);
- a zoo name (``dropwise.models.zoo.ZOO``), with ``--weights``;
- a ``package.module:factory`` reference, with ``--weights file.safetensors`` (the user's explicit reference
  is the consent to import that module; ``--kwargs`` gives the factory's JSON keyword arguments).

Packages written by ``fold`` / ``mc`` follow the convention of ``dropwise.surgery.convert``: the weights and the
architecture describe the source network (so anything that rebuilds it gets a correct model), and the
manifest's ``surgery`` list records the rewrite (``"fold"``, ``"mc"``, ``"mc:head_dropout=0.3"``), which
``apply_surgery`` replays exactly (both rewrites are deterministic functions of the weights). ``sites`` in the
manifest lists the sites of the rewritten model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LoadingError",
    "ResolvedModel",
    "apply_surgery",
    "example_input",
    "resolve_model",
    "save_rewritten",
]

_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_ZOO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEAD = re.compile(r"^mc:head_dropout=([0-9]*\.?[0-9]+)$")


class LoadingError(ValueError):
    """MODEL cannot be resolved (bad reference, missing or unfitting weights, bad options)."""


@dataclass
class ResolvedModel:
    """A source model and what is known about it.

    ``base`` is the source network with its weights (before any recorded surgery), ``model`` the same after
    replaying the package's ``surgery`` list; both are in eval mode (``model`` may be an MC model).
    """

    base: nn.Module
    model: nn.Module
    source: str
    architecture: dict[str, Any] | None
    task: str = "classification"
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    labels: list[str] | None = None
    preprocessing: str = ""
    surgery: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    target: dict[str, float] | None = None
    name: str | None = None


def _load_weights(model: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_file

    if weights.is_symlink() or not weights.is_file():
        raise LoadingError(f"weights file not found: {weights}")
    if weights.suffix != ".safetensors":
        raise LoadingError(f"weights must be a .safetensors file (never pickle): {weights}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise LoadingError(f"{weights}: unreadable safetensors file: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise LoadingError(f"{weights}: weights do not fit the network: {first}") from exc


def apply_surgery(model: nn.Module, surgery: list[str], example: Any = None) -> nn.Module:
    """Replay the rewrites recorded in a manifest's ``surgery`` list (unknown entries are weight changes
    already in the weights, such as ``recalibrate_bn``, and are skipped)."""
    from .fold import fold
    from .mc import to_mc

    for step in surgery:
        if step == "fold":
            model = fold(model, example)
        elif step == "mc":
            model = to_mc(model, example_input=example)
        elif m := _HEAD.match(step):
            model = to_mc(model, example_input=example, add_dropout_before_head=float(m.group(1)))
    return model


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError as exc:
        raise LoadingError(f"--input-shape must be comma-separated integers, got {text!r}") from exc
    if not dims or any(d < 1 for d in dims):
        raise LoadingError(f"--input-shape must be positive integers (without the batch), got {text!r}")
    return dims


def example_input(resolved: ResolvedModel, batch: int = 2) -> torch.Tensor | None:
    """A seeded example batch for the model's input spec (token ids in [0, 2) for int64), or None."""
    if resolved.input_shape is None:
        return None
    g = torch.Generator().manual_seed(0)
    if resolved.input_dtype == "int64":
        return torch.randint(0, 2, (batch, *resolved.input_shape), generator=g)
    return torch.randn(batch, *resolved.input_shape, generator=g)


def _from_package(path: Path, name: str | None, version: int | None, allow: list[str]) -> ResolvedModel:
    from dropwise.package import PackageError, load_package

    try:
        pkg = load_package(path, name, version, allow_modules=allow)
    except PackageError as exc:
        raise LoadingError(str(exc)) from exc
    m = pkg.manifest
    assert pkg.model is not None
    return ResolvedModel(
        base=pkg.model,
        model=pkg.model,
        source=str(pkg.path),
        architecture={"factory": m.architecture.factory, "kwargs": dict(m.architecture.kwargs)},
        task=m.task,
        input_shape=tuple(m.input.shape[1:]),
        input_dtype=m.input.dtype,
        labels=m.labels,
        preprocessing=m.input.preprocessing,
        surgery=list(m.surgery),
        training=dict(m.training),
        metrics=dict(m.metrics),
        target=m.target.model_dump() if m.target else None,
        name=m.name,
    )


def resolve_model(
    source: str,
    *,
    weights: str | Path | None = None,
    name: str | None = None,
    version: int | None = None,
    factory_kwargs: str | None = None,
    input_shape: str | None = None,
    input_dtype: str | None = None,
    task: str | None = None,
    allow_modules: list[str] | None = None,
    require_weights: bool = True,
) -> ResolvedModel:
    """Resolve MODEL (see the module docstring); replays a package's recorded surgery.

    Raises:
        LoadingError: with a one-line message for anything the user can fix.
    """
    allow = ["dropwise.models.", *(allow_modules or [])]
    if input_dtype is not None and input_dtype not in ("float32", "int64"):
        raise LoadingError(f"--input-dtype must be float32 or int64, got {input_dtype!r}")
    if task is not None and task not in ("classification", "regression"):
        raise LoadingError(f"--task must be classification or regression, got {task!r}")
    path = Path(source)
    if path.is_dir():
        if weights is not None:
            raise LoadingError("--weights cannot be combined with a package (it has its own weights)")
        resolved = _from_package(path, name, version, allow)
    else:
        if name is not None or version is not None:
            raise LoadingError("--name / --version apply to a package repository only")
        if _FACTORY.match(source):
            from dropwise.package import PackageError, resolve_factory

            try:
                factory = resolve_factory(source, [*allow, source.split(":")[0]])
            except PackageError as exc:
                raise LoadingError(str(exc)) from exc
            try:
                kwargs = json.loads(factory_kwargs) if factory_kwargs else {}
            except json.JSONDecodeError as exc:
                raise LoadingError(f"--kwargs is not valid JSON: {exc}") from exc
            if not isinstance(kwargs, dict):
                raise LoadingError("--kwargs must be a JSON object")
            try:
                model = factory(**kwargs)
            except TypeError as exc:
                raise LoadingError(f"calling {source} failed: {exc}") from exc
            if not isinstance(model, nn.Module):
                raise LoadingError(f"{source} returned {type(model).__name__}, not an nn.Module")
            architecture = {"factory": source, "kwargs": kwargs}
            default_name = source.split(":")[1]
            shape, dtype, task_ = None, "float32", "classification"
        elif _ZOO_NAME.match(source) and not path.exists():
            from dropwise.models.zoo import ZOO, build

            if source not in ZOO:
                raise LoadingError(
                    f"{source!r} is not a package directory, a zoo name ({', '.join(ZOO)}) or module:factory"
                )
            spec = ZOO[source]
            if factory_kwargs:
                raise LoadingError("--kwargs applies to a module:factory reference only")
            model = build(source)
            architecture = {"factory": spec.factory, "kwargs": dict(spec.kwargs)}
            default_name = source
            from dropwise.models.data import load_dataset

            ds = load_dataset(spec.dataset)
            shape, dtype, task_ = tuple(ds.input_shape), ds.input_dtype, spec.task
        else:
            raise LoadingError(f"{source!r} is not a package directory, a zoo name or a module:factory reference")
        if weights is not None:
            _load_weights(model, Path(weights))
        elif require_weights:
            raise LoadingError(f"{source} needs --weights FILE.safetensors (trained weights)")
        model.eval()
        resolved = ResolvedModel(
            base=model,
            model=model,
            source=source,
            architecture=architecture,
            task=task_,
            input_shape=shape,
            input_dtype=dtype,
            name=default_name,
        )
    if input_shape is not None:
        resolved.input_shape = _parse_shape(input_shape)
    if input_dtype is not None:
        resolved.input_dtype = input_dtype
    if task is not None:
        resolved.task = task
    if resolved.surgery:
        resolved.model = apply_surgery(resolved.base, resolved.surgery, example_input(resolved))
    return resolved


def save_rewritten(
    resolved: ResolvedModel,
    rewritten: nn.Module,
    step: str,
    output: Path,
    name: str | None,
    example: Any = None,
) -> Path:
    """Write a package for ``rewritten`` = ``step`` applied to ``resolved`` (see the module docstring)."""
    from dropwise.package import PackageError, save_package, validate_name

    from .sites import find_sites

    if resolved.architecture is None:
        raise LoadingError("the source has no architecture record; cannot write a package")
    if resolved.input_shape is None:
        raise LoadingError("the input shape is unknown: pass --input-shape (without the batch dimension)")
    package_name = name or resolved.name or "model"
    try:
        validate_name(package_name)
        return save_package(
            output,
            package_name,
            resolved.base,
            task=resolved.task,  # type: ignore[arg-type]
            input_shape=resolved.input_shape,
            input_dtype=resolved.input_dtype,  # type: ignore[arg-type]
            architecture=resolved.architecture,
            preprocessing=resolved.preprocessing,
            labels=resolved.labels,
            sites=[s.to_dict() for s in find_sites(rewritten, example)],
            surgery=[*resolved.surgery, step],
            training={**resolved.training, "rewritten_from": resolved.source},
            metrics=resolved.metrics,
            target=resolved.target,
        )
    except PackageError as exc:
        raise LoadingError(str(exc)) from exc
