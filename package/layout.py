"""The repository layout on disk: ``<repository>/<name>/<version>/``, versions listed and chosen."""

from __future__ import annotations

import re
from pathlib import Path

from dropwise.package.manifest import NAME_PATTERN, PackageError, validate_name, validate_version


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
