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

from dropwise.package.factory import DEFAULT_ALLOWED_MODULES, build_from_architecture, resolve_factory
from dropwise.package.graph import save_graph_package
from dropwise.package.io import (
    LoadedPackage,
    add_file,
    load_package,
    load_weights,
    save_package,
    sha256_file,
    state_dict_for_safetensors,
    update_manifest,
    verify_package,
    versions_installed,
)
from dropwise.package.layout import list_models, list_versions, package_path
from dropwise.package.manifest import (
    FORMAT,
    MANIFEST,
    NAME_PATTERN,
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

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "FORMAT",
    "MANIFEST",
    "NAME_PATTERN",
    "WEIGHTS",
    "Architecture",
    "InputSpec",
    "LoadedPackage",
    "Manifest",
    "PackageError",
    "Target",
    "add_file",
    "build_from_architecture",
    "list_models",
    "list_versions",
    "load_package",
    "load_weights",
    "package_path",
    "resolve_factory",
    "save_graph_package",
    "save_package",
    "sha256_file",
    "state_dict_for_safetensors",
    "update_manifest",
    "validate_filename",
    "validate_name",
    "validate_version",
    "verify_package",
    "versions_installed",
]
