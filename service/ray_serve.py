"""Scale-out on Ray Serve: the same FastAPI app, replicated.

`serve.ingress` wraps the app that `create_app` builds, so every route, error format, batcher and metric of
the single-process service is what each replica serves; Ray Serve's proxy spreads requests over replicas.
Replicas and GPUs per replica are deployment options (`num_replicas`, `num_gpus`).

    from ray import serve
    from dropwise.service.ray_serve import build_deployment
    serve.run(build_deployment(Settings(repository=Path("model_repository")), num_replicas=2))

Requires the `ray` extra (`pip install -e '.[cpu,ray]'`).
"""

from __future__ import annotations

from typing import Any

from dropwise.service.app import create_app
from dropwise.service.settings import Settings


def build_deployment(
    settings: Settings | None = None,
    *,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str = "dropwise",
) -> Any:
    """A bound Ray Serve application serving `create_app(settings)` on `num_replicas` replicas.

    Each replica builds its own app (and so loads the repository and runs its own batcher); with
    `num_gpus > 0` Ray places each replica on a GPU and the service's `device=auto` picks it up.
    """
    from ray import serve

    settings = settings or Settings()
    app = create_app(settings)

    @serve.deployment(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    )
    @serve.ingress(app)
    class DropwiseDeployment:
        """One replica of the dropwise service (the app's lifespan loads the models)."""

    return DropwiseDeployment.bind()


__all__ = ["build_deployment"]
