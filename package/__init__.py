"""Model packages: a Triton-style model repository entry that can be verified before anything is read.

Layout: ``<repository>/<name>/<version>/`` with ``manifest.json`` and ``weights.safetensors`` (written here),
plus ``model.onnx``, ``model.mc.onnx`` and ``parity.json`` that the exporter adds with :func:`add_file`.

Safety rules, all enforced on load:

- the manifest lists the sha256 of every other file of the version directory; a checksum mismatch, a missing
  file, an extra file, a sub-directory or a symbolic link is refused with :class:`PackageError` *before* any
  file other than the manifest is read;
- weights are safetensors only, never pickle;
- names match ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`` (so no path separators and no ``..``), versions are
  positive integers (the latest by default);
- the architecture's ``module:factory`` is imported only when the module lies under an allow-listed prefix
  (``dropwise.models.`` by default), because importing a module named by a manifest is code execution. Callers opt in
  to their own modules with ``allow_modules=``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from dropwise.errors import DropwiseError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT = "dropwise-package/1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = ("dropwise.models.",)
_FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class PackageError(DropwiseError):
    """A model package is missing, malformed, tampered with, or not allowed to be loaded."""


# --------------------------------------------------------------------------------------------- manifest


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
        if not _FACTORY_PATTERN.fullmatch(factory):
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


@dataclass(frozen=True)
class LoadedPackage:
    """A verified package: manifest, rebuilt model (eval mode; None when not built) and directory."""

    manifest: Manifest
    model: nn.Module | None
    path: Path


# --------------------------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`PackageError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in {".", ".."}:
        raise PackageError(
            f"invalid model name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . - (not first)"
        )
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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions_installed() -> dict[str, str | None]:
    """Versions of the libraries a package depends on (None when not installed)."""
    out: dict[str, str | None] = {"torch": torch.__version__}
    for dist in ("onnx", "onnxruntime", "onnxruntime-gpu", "safetensors", "dropwise"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out.get("onnxruntime") is None and out.get("onnxruntime-gpu") is not None:
        out["onnxruntime"] = out["onnxruntime-gpu"]
    out.pop("onnxruntime-gpu")
    return out


# --------------------------------------------------------------------------------------------- factories


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
    if not isinstance(factory, str) or not _FACTORY_PATTERN.fullmatch(factory):
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
    arch = (
        architecture if isinstance(architecture, Architecture) else Architecture.model_validate(architecture)
    )
    fn = resolve_factory(arch.factory, allow_modules)
    model = fn(**arch.kwargs)
    if not isinstance(model, nn.Module):
        raise PackageError(f"factory {arch.factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


# --------------------------------------------------------------------------------------------- reading


def _read_manifest(package_dir: Path) -> Manifest:
    path = package_dir / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{package_dir}: no {MANIFEST}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: unreadable manifest: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except (ValidationError, PackageError) as exc:
        raise PackageError(f"{path}: invalid manifest: {exc}") from exc


def verify_package(package_dir: str | Path) -> Manifest:
    """Check a version directory against its manifest and return the manifest.

    Every file other than ``manifest.json`` must be listed with a matching sha256; missing files, extra
    files, sub-directories and symbolic links are refused. Nothing but the manifest is parsed.

    Raises:
        PackageError: on any mismatch, naming the file.
    """
    package_dir = Path(package_dir)
    if package_dir.is_symlink() or not package_dir.is_dir():
        raise PackageError(f"{package_dir}: not a package directory")
    manifest = _read_manifest(package_dir)
    present: set[str] = set()
    for entry in os.scandir(package_dir):
        if entry.name == MANIFEST:
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise PackageError(
                f"{package_dir}: unexpected entry {entry.name!r} (only plain files are allowed)"
            )
        present.add(entry.name)
    listed = set(manifest.files)
    if missing := sorted(listed - present):
        raise PackageError(f"{package_dir}: missing file(s) listed in the manifest: {', '.join(missing)}")
    if extra := sorted(present - listed):
        raise PackageError(f"{package_dir}: file(s) not listed in the manifest: {', '.join(extra)}")
    for filename in sorted(listed):
        actual = sha256_file(package_dir / filename)
        if actual != manifest.files[filename]:
            raise PackageError(
                f"{package_dir / filename}: sha256 mismatch (manifest {manifest.files[filename][:12]}..., "
                f"file {actual[:12]}...): the package was modified; refusing to load it"
            )
    return manifest


def list_versions(model_dir: Path) -> list[int]:
    """Numeric version directories of ``<repository>/<name>``, ascending (non-numeric entries ignored)."""
    if not model_dir.is_dir():
        return []
    out = []
    for entry in model_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink() and re.fullmatch(r"[1-9][0-9]{0,8}", entry.name):
            out.append(int(entry.name))
    return sorted(out)


def list_models(repository: str | Path) -> list[str]:
    """Model names in a repository (directories with a valid name and at least one version)."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(
        e.name
        for e in repository.iterdir()
        if e.is_dir() and not e.is_symlink() and NAME_PATTERN.fullmatch(e.name) and list_versions(e)
    )


def package_path(repository: str | Path, name: str, version: int | str | None = None) -> Path:
    """Directory of ``name`` at ``version`` (latest when None) in ``repository``; validates both."""
    validate_name(name)
    model_dir = Path(repository) / name
    if version is None:
        versions = list_versions(model_dir)
        if not versions:
            raise PackageError(f"no package named {name!r} in {repository}")
        version = versions[-1]
    version = validate_version(version)
    path = model_dir / str(version)
    if not path.is_dir():
        raise PackageError(f"no version {version} of {name!r} in {repository}")
    return path


def load_weights(package_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The safetensors state dict of a verified package (never unpickles)."""
    if WEIGHTS not in manifest.files:
        raise PackageError(f"{package_dir}: manifest lists no {WEIGHTS}")
    try:
        return load_file(str(package_dir / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise PackageError(f"{package_dir / WEIGHTS}: unreadable safetensors file: {exc}") from exc


def load_package(
    path_or_repo: str | Path,
    name: str | None = None,
    version: int | str | None = None,
    *,
    allow_modules: Sequence[str] | None = None,
    build: bool = True,
) -> LoadedPackage:
    """Verify and load a package; the model is returned in eval mode.

    Args:
        path_or_repo: a version directory (holding ``manifest.json``), a model directory (latest version
            chosen), or a repository when ``name`` is given.
        name: model name inside the repository.
        version: positive integer; the latest when None.
        allow_modules: factory module prefixes that may be imported (default ``("dropwise.models.",)``).
        build: when False, only verify and return the manifest (``model`` is None).

    Raises:
        PackageError: invalid name/version, missing package, checksum mismatch, missing or extra file,
            factory not allowed, or weights that do not fit the rebuilt network.
    """
    root = Path(path_or_repo)
    if name is not None:
        package_dir = package_path(root, name, version)
    elif (root / MANIFEST).exists():
        if version is not None:
            raise PackageError("version given together with a version directory")
        package_dir = root
    else:
        package_dir = package_path(root.parent, root.name, version)
    manifest = verify_package(package_dir)
    if manifest.name != package_dir.parent.name or str(manifest.version) != package_dir.name:
        raise PackageError(
            f"{package_dir}: manifest says {manifest.name!r} version {manifest.version}, "
            "which does not match its location"
        )
    if not build:
        return LoadedPackage(manifest=manifest, model=None, path=package_dir)
    state = load_weights(package_dir, manifest)
    model = build_from_architecture(manifest.architecture, allow_modules)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackageError(
            f"{package_dir}: weights do not fit {manifest.architecture.factory}: {exc}"
        ) from exc
    model.eval()
    return LoadedPackage(manifest=manifest, model=model, path=package_dir)


# --------------------------------------------------------------------------------------------- writing


def _write_manifest(package_dir: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    tmp = package_dir / f".{MANIFEST}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, package_dir / MANIFEST)


def state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _one_input(name: str, shape: Sequence[int] | None, dtype: str | None, preprocessing: str) -> InputSpec:
    if shape is None or dtype is None:
        raise PackageError("save_package needs input_shape and input_dtype, or inputs")
    try:
        return InputSpec(name=name, shape=[-1, *shape], dtype=dtype, preprocessing=preprocessing)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise PackageError(f"invalid input spec: {exc}") from exc


def save_package(
    repository: str | Path,
    name: str,
    model: nn.Module,
    *,
    task: Literal["classification", "regression"],
    input_shape: Sequence[int] | None = None,
    input_dtype: Literal["float32", "int64"] | None = None,
    architecture: Architecture | Mapping[str, Any],
    inputs: Sequence[InputSpec] | None = None,
    preprocessing: str = "",
    input_name: str = "input",
    labels: Sequence[str] | None = None,
    sites: Sequence[Mapping[str, Any]] = (),
    surgery: Iterable[str] = (),
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    target: Mapping[str, float] | None = None,
    version: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a new package version and return its directory.

    A one-input model is described by ``input_shape`` (without the batch dimension, recorded as ``-1``),
    ``input_dtype``, ``input_name`` and ``preprocessing``; a model with several inputs passes ``inputs``
    instead (one :class:`InputSpec` each, in the order ``forward`` takes them). The version is the next free one
    when None; an existing version is never overwritten. The directory is written under a temporary name
    and renamed into place, so readers never see half a package. ``sites`` are the JSON-able site records
    the caller found (``dropwise.surgery.sites.site_records``); the package format does not look for them.
    """
    validate_name(name)
    repository = Path(repository)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = list_versions(model_dir)
        version = existing[-1] + 1 if existing else 1
    version = validate_version(version)
    final = model_dir / str(version)
    if final.exists():
        raise PackageError(f"{final} already exists; packages are immutable, choose another version")
    manifest = Manifest(
        name=name,
        version=version,
        task=task,
        inputs=list(inputs)
        if inputs is not None
        else [_one_input(input_name, input_shape, input_dtype, preprocessing)],
        labels=list(labels) if labels is not None else None,
        architecture=architecture
        if isinstance(architecture, Architecture)
        else Architecture.model_validate(architecture),
        sites=[json.loads(json.dumps(dict(r), default=str)) for r in sites],
        surgery=list(surgery),
        training=dict(training or {}),
        metrics=dict(metrics or {}),
        versions=versions_installed(),
        target=Target.model_validate(dict(target)) if target is not None else None,
        **dict(extra or {}),
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_dir))
    try:
        save_file(state_dict_for_safetensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        manifest.files = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        _write_manifest(tmp, manifest)
        tmp.chmod(0o755)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def add_file(package_dir: str | Path, filename: str, data_or_path: bytes | str | Path) -> str:
    """Add (or replace) ``filename`` in a verified package and record its sha256; returns the digest.

    ``data_or_path`` is the file's bytes or a path to copy. The package is verified first, so a tampered
    package is never re-hashed into looking valid. ``weights.safetensors`` cannot be replaced this way.
    """
    package_dir = Path(package_dir)
    validate_filename(filename)
    if filename == WEIGHTS:
        raise PackageError(f"{WEIGHTS} is written by save_package only")
    manifest = verify_package(package_dir)
    target = package_dir / filename
    tmp = package_dir / f".{filename}.tmp"
    try:
        if isinstance(data_or_path, bytes):
            tmp.write_bytes(data_or_path)
        else:
            shutil.copyfile(Path(data_or_path), tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = sha256_file(target)
    manifest.files = {**manifest.files, filename: digest}
    _write_manifest(package_dir, manifest)
    return digest


def update_manifest(package_dir: str | Path, **fields: Any) -> Manifest:
    """Set manifest fields (e.g. ``surgery``, ``metrics``, ``sites``) of a verified package; returns it.

    ``name``, ``version`` and ``files`` cannot be changed here (use :func:`add_file` for files).
    """
    package_dir = Path(package_dir)
    forbidden = {"name", "version", "files", "format"} & set(fields)
    if forbidden:
        raise PackageError(f"cannot update {sorted(forbidden)} with update_manifest")
    manifest = verify_package(package_dir)
    data = manifest.model_dump(mode="json")
    data.update(fields)
    try:
        updated = Manifest.model_validate(data)
    except ValidationError as exc:
        raise PackageError(f"invalid manifest update: {exc}") from exc
    _write_manifest(package_dir, updated)
    return updated
