"""Graph-only packages: ONNX graphs and a manifest, no ``weights.safetensors`` (e.g. converted from an ONNX file).

Same safety rules as every package (`dropwise.package.io`): the manifest hashes every file, versions are
never overwritten, the directory appears atomically. There is no torch network to rebuild, so
`dropwise.package.io.load_package` refuses ``build=True`` for them and names the onnxruntime backend.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from dropwise.package.io import _write_manifest, sha256_file, versions_installed
from dropwise.package.layout import list_versions
from dropwise.package.manifest import (
    WEIGHTS,
    Architecture,
    InputSpec,
    Manifest,
    PackageError,
    validate_filename,
    validate_name,
)

__all__ = ["save_graph_package"]


def save_graph_package(
    repository: str | Path,
    name: str,
    files: Mapping[str, bytes],
    *,
    task: Literal["classification", "regression"],
    input_shape: Sequence[int],
    input_dtype: Literal["float32", "int64"],
    architecture: Architecture | Mapping[str, Any],
    input_name: str = "input",
    sites: Sequence[Mapping[str, Any]] = (),
    surgery: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a package of graph files only (no ``weights.safetensors``), e.g. converted from an ONNX file.

    Same rules as `save_package` (next free version, atomic rename, every file hashed in the manifest).
    `load_package` refuses to build a model from it (nothing to rebuild a torch network from).
    """
    validate_name(name)
    for filename in files:
        validate_filename(filename)
        if filename == WEIGHTS:
            raise PackageError(f"{WEIGHTS} is written by save_package only")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = list_versions(model_dir)
    version = existing[-1] + 1 if existing else 1
    manifest = Manifest(
        name=name,
        version=version,
        task=task,
        input=InputSpec(name=input_name, shape=[-1, *input_shape], dtype=input_dtype),
        architecture=architecture
        if isinstance(architecture, Architecture)
        else Architecture.model_validate(architecture),
        sites=[json.loads(json.dumps(dict(r), default=str)) for r in sites],
        surgery=list(surgery),
        versions=versions_installed(),
        **dict(extra or {}),
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_dir))
    try:
        for filename, data in files.items():
            (tmp / filename).write_bytes(data)
        manifest.files = {filename: sha256_file(tmp / filename) for filename in files}
        _write_manifest(tmp, manifest)
        tmp.chmod(0o755)
        os.replace(tmp, model_dir / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir / str(version)
