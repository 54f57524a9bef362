"""Per-model serving configuration stored with a package: the manifest's ``serving`` key.

A package may carry how it wants to be served, as a Triton model's ``config.pbtxt`` does: the dynamic
batcher's limits (``max_batch_size``, ``max_queue_delay_ms``, ``queue_capacity``), MC-dropout's default and
largest sample count T (``default_samples``, ``max_samples``), the request deadline
(``request_timeout_s``), and which versions of the model a server keeps loaded (``version_policy``).
Every field is optional: a field left out falls back to the server's global setting. The manifest is not
covered by the package checksums (only the files it lists are), so an operator can change a package's
serving configuration with :func:`set_serving_config` without rewriting its weights.

The version policy is Triton's: ``{"latest": N}`` (the N highest versions; the default is latest 1),
``{"all": true}``, or ``{"specific": [1, 3]}``. A server reads it from the newest valid version of a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropwise.package import Manifest, PackageError, update_manifest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: The manifest key holding the serving configuration.
SERVING_KEY = "serving"

__all__ = ["SERVING_KEY", "ServingConfig", "VersionPolicy", "serving_config", "set_serving_config"]


class VersionPolicy(BaseModel):
    """Which versions of a model are served: exactly one of ``latest``, ``all`` or ``specific``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(None, ge=1, le=1000, description="Serve the N highest versions.")
    all: bool | None = Field(None, description="Serve every version.")
    specific: tuple[int, ...] | None = Field(None, min_length=1, description="Serve these versions.")

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        given = [name for name in ("latest", "all", "specific") if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"version_policy takes one of latest, all, specific; got {given}")
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError("version_policy.specific lists positive version numbers")
        return self

    def select(self, versions: list[int]) -> list[int]:
        """The versions this policy serves among `versions` (ascending)."""
        available = sorted(set(versions))
        if self.all:
            return available
        if self.specific is not None:
            return [v for v in available if v in set(self.specific)]
        return available[-(self.latest or 1) :]

    def describe(self) -> str:
        """The policy in words, e.g. ``latest 1``."""
        if self.all:
            return "all"
        if self.specific is not None:
            return "specific " + ", ".join(map(str, self.specific))
        return f"latest {self.latest or 1}"

    def to_triton(self) -> dict[str, Any]:
        """The policy as Triton's ``version_policy`` message (JSON form)."""
        if self.all:
            return {"all": {}}
        if self.specific is not None:
            return {"specific": {"versions": list(self.specific)}}
        return {"latest": {"num_versions": self.latest or 1}}


class ServingConfig(BaseModel):
    """How a model is served; None leaves a field to the server's global setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, le=65536, description="Most rows a batch gathers.")
    max_queue_delay_ms: float | None = Field(None, ge=0, le=10_000, description="Longest wait to fill a batch.")
    queue_capacity: int | None = Field(None, ge=1, le=1_000_000, description="Requests waiting before 429.")
    default_samples: int | None = Field(None, ge=1, le=100_000, description="T when a request names none.")
    max_samples: int | None = Field(None, ge=1, le=100_000, description="Largest MC sample count T.")
    request_timeout_s: float | None = Field(None, gt=0, le=86_400, description="Deadline of a request.")
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy, description="Versions served.")

    @model_validator(mode="after")
    def _samples_consistent(self) -> ServingConfig:
        if (
            self.default_samples is not None
            and self.max_samples is not None
            and self.default_samples > self.max_samples
        ):
            raise ValueError(f"default_samples ({self.default_samples}) exceeds max_samples ({self.max_samples})")
        return self

    def overrides(self) -> dict[str, Any]:
        """The fields this package sets (the server's settings of the same names are replaced)."""
        return self.model_dump(exclude_none=True, exclude={"version_policy"})


def serving_config(manifest: Manifest) -> ServingConfig:
    """The serving configuration recorded in `manifest` (all defaults when it records none).

    Raises:
        PackageError: when the recorded configuration is invalid.
    """
    raw = (manifest.model_extra or {}).get(SERVING_KEY)
    if raw is None:
        return ServingConfig()
    try:
        return ServingConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or SERVING_KEY}: {e['msg']}" for e in exc.errors())
        raise PackageError(f"invalid serving configuration in the manifest: {problems}") from None


def set_serving_config(package_dir: str | Path, config: ServingConfig | dict[str, Any]) -> Manifest:
    """Record `config` as the package's serving configuration (the package is verified first)."""
    try:
        checked = config if isinstance(config, ServingConfig) else ServingConfig.model_validate(config)
    except ValidationError as exc:
        raise PackageError(f"invalid serving configuration: {exc}") from None
    return update_manifest(package_dir, **{SERVING_KEY: checked.model_dump(mode="json", exclude_none=True)})
