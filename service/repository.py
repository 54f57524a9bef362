"""The model repository as in Triton: `<repo>/<model>/<version>/`, numeric versions, latest by default.

Scanning reads and verifies each package's manifest (checksums included, nothing unpickled) and its serving
configuration (`dropwise.package.serving`); a package that fails is refused with its reason in `errors`.
Loading picks the runtime for the configured backend and device. Which versions are served, and when they
change, is `dropwise.service.model_control`'s business.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dropwise.package import Manifest, PackageError, list_models, list_versions, load_package, validate_name
from dropwise.package.serving import serving_config
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


def _signature(path: Path) -> tuple[Any, ...] | None:
    """Names, sizes, inodes and times of a directory and its entries (None when it cannot be read)."""
    try:
        entries = [path, *sorted(path.iterdir())]
        stats = [entry.lstat() for entry in entries]
    except OSError:
        return None
    pairs = zip(entries, stats, strict=True)
    return tuple((entry.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for entry, st in pairs)


class ModelRepository:
    """Finds packages under `root` and builds runtimes for them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        #: packages that failed verification: "name/version" -> reason
        self.errors: dict[str, str] = {}
        #: version directory -> (its files' stat signature, spec or refusal) from the last verification
        self._verified: dict[Path, tuple[tuple[Any, ...], PackageSpec | str]] = {}

    def scan(self) -> dict[str, dict[int, PackageSpec]]:
        """Every valid package version, by model name then version; invalid ones land in `errors`."""
        found: dict[str, dict[int, PackageSpec]] = {}
        previous = dict(self.errors)
        self.errors.clear()
        for name in list_models(self.root):
            versions = self._scan_versions(name, previous)
            if versions:
                found[name] = versions
        return found

    def scan_model(self, name: str) -> dict[int, PackageSpec]:
        """The valid versions of one model (its entries in `errors` are replaced by this scan's)."""
        validate_name(name)
        previous = {k: v for k, v in self.errors.items() if k.split("/", 1)[0] == name}
        for key in previous:
            del self.errors[key]
        return self._scan_versions(name, previous)

    def _scan_versions(self, name: str, previous: dict[str, str]) -> dict[int, PackageSpec]:
        found: dict[int, PackageSpec] = {}
        for version in list_versions(self.root / name):
            path = self.root / name / str(version)
            key = f"{name}/{version}"
            outcome = self._verify(path)
            if isinstance(outcome, str):
                if previous.get(key) != outcome:  # log each refusal once, not on every scan
                    log.error("refusing %s: %s", key, outcome)
                self.errors[key] = outcome
                continue
            found[version] = outcome
        return found

    def _verify(self, path: Path) -> PackageSpec | str:
        """The spec of a valid package, or the reason it is refused.

        A directory whose files have not changed since its last verification (same names, sizes, inodes,
        modification and change times) is not hashed again, so polling a large repository stays cheap;
        loading a version always verifies its checksums anew.
        """
        signature = _signature(path)
        cached = self._verified.get(path)
        if signature is not None and cached is not None and cached[0] == signature:
            return cached[1]
        outcome: PackageSpec | str
        try:
            loaded = load_package(path, build=False)
            serving_config(loaded.manifest)  # an invalid serving configuration refuses the package
            outcome = spec_from_manifest(loaded.manifest, loaded.path)
        except PackageError as exc:
            outcome = str(exc)
        if signature is not None:
            self._verified[path] = (signature, outcome)
        return outcome

    def load_runtime(
        self, spec: PackageSpec, backend: str, device: str, *, mc_compile: str = "off", **options: Any
    ) -> Runtime:
        """Build and load the runtime of one package version on `backend` and `device` (``mc_compile``: the
        torch backend's `Settings.mc_compile`)."""
        if backend == "torch":
            from dropwise.service.runtimes.torch_runtime import TorchRuntime

            runtime: Runtime = TorchRuntime(spec, device=device, mc_compile=mc_compile, **options)
        elif backend == "onnxruntime":
            from dropwise.service.runtimes.onnx_runtime import OnnxRuntime

            runtime = OnnxRuntime(spec, device=device, **options)
        else:
            raise ValueError(f"unknown backend {backend!r}: choose torch or onnxruntime")
        runtime.load()
        return runtime
