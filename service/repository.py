"""The model repository as in Triton: `<repo>/<model>/<version>/`, numeric versions, latest by default.

Scanning reads and verifies each package's manifest (checksums included, nothing unpickled); loading picks
the runtime for the configured backend and device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dropwise.package import LoadedPackage, Manifest, PackageError, list_models, list_versions, load_package
from dropwise.service.runtimes.base import PackageSpec, Runtime

log = logging.getLogger("dropwise.repository")


def spec_from_manifest(manifest: Manifest, path: Path) -> PackageSpec:
    """The service's view of a package manifest."""
    target = manifest.target
    return PackageSpec(
        name=manifest.name,
        version=manifest.version,
        path=path,
        task=manifest.task,
        input_name=manifest.input.name,
        input_shape=tuple(manifest.input.shape),
        input_dtype=manifest.input.dtype,
        preprocessing=manifest.input.preprocessing,
        labels=tuple(manifest.labels) if manifest.labels else None,
        sites=tuple(dict(site) for site in manifest.sites),
        target_mean=float(target.mean) if target else 0.0,
        target_std=float(target.std) if target else 1.0,
        files=tuple(sorted(manifest.files)),
        manifest=manifest.model_dump(mode="json"),
        inputs=tuple(manifest.inputs),
        input_range=manifest.input.range,
    )


class ModelRepository:
    """Finds packages under `root` and builds runtimes for them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        #: packages that failed verification: "name/version" -> reason (they keep /readyz false)
        self.errors: dict[str, str] = {}

    def scan(self) -> dict[str, dict[int, PackageSpec]]:
        """Every valid package version, by model name then version; invalid ones land in `errors`."""
        found: dict[str, dict[int, PackageSpec]] = {}
        self.errors.clear()
        for name in list_models(self.root):
            for version in list_versions(self.root / name):
                path = self.root / name / str(version)
                try:
                    loaded = load_package(path, build=False)
                except PackageError as exc:
                    log.error("skipping %s/%s: %s", name, version, exc)
                    self.errors[f"{name}/{version}"] = str(exc)
                    continue
                found.setdefault(name, {})[version] = spec_from_manifest(loaded.manifest, loaded.path)
        return found

    @staticmethod
    def load_package(spec: PackageSpec) -> LoadedPackage:
        """Verify and rebuild the torch model of a package (safetensors only)."""
        return load_package(spec.path)

    def load_runtime(self, spec: PackageSpec, backend: str, device: str, **options: Any) -> Runtime:
        """Build and load the runtime of one package version on `backend` and `device`."""
        if backend == "torch":
            from dropwise.service.runtimes.torch_runtime import TorchRuntime

            runtime: Runtime = TorchRuntime(spec, device=device, **options)
        elif backend == "onnxruntime":
            from dropwise.service.runtimes.onnx_runtime import OnnxRuntime

            runtime = OnnxRuntime(spec, device=device, **options)
        else:
            raise ValueError(f"unknown backend {backend!r}: choose torch or onnxruntime")
        runtime.load()
        return runtime
