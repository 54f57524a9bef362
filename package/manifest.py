"""The package manifest: what a model package declares (inputs, task, architecture, files) and the name rules.

A manifest is validated by pydantic on read; names match ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`` (no path
separators, no ``..``), versions are positive integers, file names are plain names.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dropwise.errors import DropwiseError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT = "dropwise-package/1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class PackageError(DropwiseError):
    """A model package is missing, malformed, tampered with, or not allowed to be loaded."""


INPUT_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class InputSpec(BaseModel):
    """One named input of the model: shape with ``-1`` for the dynamic batch dimension, dtype, preprocessing.

    ``range`` is ``[low, high)`` of the values an integer input may take (token ids below the vocabulary
    size, a 0/1 attention mask); None when unknown or for float inputs.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    shape: list[int]
    dtype: Literal["float32", "int64"]
    preprocessing: str = ""
    range: tuple[int, int] | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not INPUT_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"input name {name!r} must match {INPUT_NAME_PATTERN.pattern}")
        return name

    @field_validator("range")
    @classmethod
    def _check_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and value[0] >= value[1]:
            raise ValueError(f"input range must be [low, high) with low < high, got {list(value)}")
        return value

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, shape: list[int]) -> list[int]:
        if not shape or shape[0] != -1:
            raise ValueError("input shape must start with -1 (the dynamic batch dimension)")
        if any(d <= 0 for d in shape[1:]):
            raise ValueError("input dimensions after the batch must be positive")
        return shape


class Architecture(BaseModel):
    """How to rebuild the network: ``module:factory`` and the keyword arguments to call it with."""

    model_config = ConfigDict(extra="forbid")

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, factory: str) -> str:
        if not FACTORY_PATTERN.fullmatch(factory):
            raise ValueError(f"factory must look like 'package.module:function', got {factory!r}")
        return factory


class Target(BaseModel):
    """Standardisation of a regression target: ``y = mean + std * output``."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float


class Manifest(BaseModel):
    """``manifest.json`` of a model package (see docs/CONTRACTS.md, "Model packages").

    Unknown top-level keys are kept (other parts may record more, e.g. export options); the known ones are
    validated.
    """

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    name: str
    version: int
    task: Literal["classification", "regression"]
    inputs: list[InputSpec] = Field(min_length=1)
    labels: list[str] | None = None
    architecture: Architecture
    sites: list[dict[str, Any]] = Field(default_factory=list)
    surgery: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str | None] = Field(default_factory=dict)
    target: Target | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_input_form(cls, data: Any) -> Any:
        """A manifest of the one-input format (``"input": {...}``) reads as ``"inputs": [{...}]``."""
        if isinstance(data, dict) and "input" in data and "inputs" not in data:
            data = dict(data)
            data["inputs"] = [data.pop("input")]
        return data

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, inputs: list[InputSpec]) -> list[InputSpec]:
        names = [spec.name for spec in inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        return inputs

    @property
    def input(self) -> InputSpec:
        """The first (for most models the only) input."""
        return self.inputs[0]

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        try:
            return validate_name(name)
        except PackageError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("version")
    @classmethod
    def _check_version(cls, version: int) -> int:
        try:
            return validate_version(version)
        except PackageError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, str]) -> dict[str, str]:
        for filename, digest in files.items():
            if not NAME_PATTERN.fullmatch(filename) or filename in {".", "..", MANIFEST}:
                raise ValueError(f"invalid package file name {filename!r}")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"file {filename!r}: sha256 must be 64 lowercase hex digits")
        return files


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`PackageError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in {".", ".."}:
        raise PackageError(f"invalid model name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . - (not first)")
    return name


def validate_version(version: int | str) -> int:
    """Return ``version`` as a positive int, else raise :class:`PackageError`."""
    if isinstance(version, bool):
        raise PackageError(f"invalid version {version!r}: must be a positive integer")
    if isinstance(version, str):
        if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
            raise PackageError(f"invalid version {version!r}: must be a positive integer")
        version = int(version)
    if not isinstance(version, int) or version < 1:
        raise PackageError(f"invalid version {version!r}: must be a positive integer")
    return version


def validate_filename(filename: str) -> str:
    """Return ``filename`` if it is a plain file name inside a package, else raise :class:`PackageError`."""
    if not NAME_PATTERN.fullmatch(filename) or filename in {".", "..", MANIFEST}:
        raise PackageError(f"invalid package file name {filename!r}")
    return filename
