"""Reading and writing packages: verify checksums before reading, write atomically, never unpickle.

On load the manifest lists the sha256 of every other file of the version directory; a checksum mismatch, a
missing file, an extra file, a sub-directory or a symbolic link is refused with ``PackageError`` *before*
any file other than the manifest is read. Weights are safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from dropwise.package.factory import build_from_architecture
from dropwise.package.layout import list_versions, package_path
from dropwise.package.manifest import (
    MANIFEST,
    WEIGHTS,
    Architecture,
    InputSpec,
    Manifest,
    PackageError,
    Target,
    validate_filename,
    validate_name,
    validate_version,
)
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class LoadedPackage:
    """A verified package: manifest, rebuilt model (eval mode; None when not built) and directory."""

    manifest: Manifest
    model: nn.Module | None
    path: Path


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
            raise PackageError(f"{package_dir}: unexpected entry {entry.name!r} (only plain files are allowed)")
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
    if WEIGHTS not in manifest.files:
        raise PackageError(
            f"{package_dir}: no {WEIGHTS}, only graph files ({', '.join(sorted(manifest.files))}): there is "
            "no torch network to rebuild (a package converted from an ONNX file); serve it with the "
            "onnxruntime backend"
        )
    state = load_weights(package_dir, manifest)
    model = build_from_architecture(manifest.architecture, allow_modules)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{package_dir}: weights do not fit {manifest.architecture.factory}: {exc}") from exc
    model.eval()
    return LoadedPackage(manifest=manifest, model=model, path=package_dir)


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
        return InputSpec(name=name, shape=[-1, *shape], dtype=dtype, preprocessing=preprocessing)
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
        inputs=list(inputs) if inputs else [_one_input(input_name, input_shape, input_dtype, preprocessing)],
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
