"""Service settings: command-line flags and `DROPWISE_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REPOSITORY = Path("model_repository")


class Settings(BaseSettings):
    """Everything the service can be told; each field is also read from `DROPWISE_<FIELD>`.

    Example: `DROPWISE_MAX_BATCH_SIZE=128 DROPWISE_DEVICE=cpu dropwise serve`.
    """

    model_config = SettingsConfigDict(env_prefix="DROPWISE_", extra="ignore", validate_default=True)

    repository: Path = Field(DEFAULT_REPOSITORY, description="Model repository: <repo>/<model>/<version>/.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn binds (0 picks a free one).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses a GPU when one is present.")
    backend: Literal["torch", "onnxruntime"] = Field("torch", description="Runtime for every model.")
    max_batch_size: int = Field(
        64, ge=1, le=65536, description="Most rows a batch gathers (a larger request runs alone)."
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Longest wait to fill a batch (0, as in Triton: batch what queued during the last pass).",
    )
    queue_capacity: int = Field(256, ge=1, le=1_000_000, description="Requests waiting per model before 429.")
    max_rows_per_request: int = Field(1024, ge=1, description="Most examples one request may carry.")
    max_samples: int = Field(256, ge=1, le=100_000, description="Largest MC sample count T.")
    default_samples: int = Field(32, ge=1, description="T used when an MC request names none.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of a request; past it answers 504.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with 429 answers.")
    log_level: str = Field("info", description="uvicorn and service log level.")
    model_control: Literal["none", "explicit", "poll"] = Field(
        "none",
        description=(
            "Repository control, as Triton's --model-control-mode: none (load at start only), explicit "
            "(load/unload on POST /v2/repository/models/{name}/load|unload), poll (rescan every "
            "poll_interval_s and swap new versions in)."
        ),
    )
    poll_interval_s: float = Field(
        15.0, gt=0, le=86_400, description="Seconds between repository scans when model_control is poll."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token the repository-control routes require; unset, those routes answer 403.",
    )
    mc_compile: Literal["off", "default", "reduce-overhead"] = Field(
        "off",
        description=(
            "torch backend: run each MC batch's tail, masks and summaries as one torch.compile'd function "
            "(default) or that plus CUDA graphs on CUDA (reduce-overhead); compiled while a model loads."
        ),
    )
    ray_gpus_per_replica: float = Field(
        0.0, ge=0, le=64, description="GPUs Ray Serve reserves for each replica (dropwise serve --ray)."
    )
    ray_cpus_per_replica: float = Field(
        1.0, gt=0, le=1024, description="CPUs Ray Serve reserves for each replica (dropwise serve --ray)."
    )
    max_mc_sample_rows: int = Field(
        65_536,
        ge=1,
        description=(
            "Most sample-rows (rows x T) one MC request may ask for; larger answers 413 naming this limit, "
            "so the largest allowed request fits the default deadline."
        ),
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="A client that sends no body data for this long gets 408 (stalled upload)."
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="On SIGTERM: how long in-flight requests may run before queued ones get 503."
    )
    # ---------------------------------------------------------------- security
    api_token: SecretStr | None = Field(
        None, description="When set, inference and model routes need `Authorization: Bearer <token>`."
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed by CORS (empty: CORS off, no CORS headers)."
    )
    allow_unauthenticated: bool = Field(
        False, description="Allow `dropwise serve` to bind a non-loopback address without an API token."
    )

    @property
    def cors_origin_list(self) -> list[str]:
        """`cors_origins` split on commas (empty list: CORS off)."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
