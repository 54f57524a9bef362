"""Scale-out on Ray Serve: the same FastAPI app, replicated, started by `dropwise serve --ray --replicas N`.

`serve.ingress` wraps the app that `create_app` builds, so every route, error format, batcher and metric of
the single-process service is what each replica serves; Ray Serve's proxy spreads requests over replicas.
Each replica loads the repository itself (its own batchers and warm-up) and stamps every answer with
`X-Dropwise-Replica: <replica id>; pid=<process id>`, so a client (and the test) sees which replica answered.
A replica whose process dies is replaced by the Serve controller; until then the proxy sends requests
to the replicas alive (health checks every `health_check_period_s`).

Settings: `DROPWISE_RAY_GPUS_PER_REPLICA` (default 0: CPU replicas; with GPUs the service's `device=auto`
picks the replica's GPU) and `DROPWISE_RAY_CPUS_PER_REPLICA`.

    from ray import serve
    from dropwise.service.ray_serve import build_deployment
    serve.run(build_deployment(Settings(repository=Path("model_repository")), num_replicas=2))

Requires the `ray` extra (`pip install -e '.[cpu,ray]'`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from dropwise.service.app import create_app
from dropwise.service.settings import Settings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dropwise.ray_serve")

REPLICA_HEADER = "x-dropwise-replica"

__all__ = ["REPLICA_HEADER", "ReplicaHeaderMiddleware", "build_deployment", "run"]


def replica_identity() -> str:
    """`<Serve replica id>; pid=<pid>` inside a replica, `local; pid=<pid>` outside Ray Serve."""
    replica = "local"
    try:
        from ray import serve

        context = serve.get_replica_context()
        replica_id = getattr(context, "replica_id", None)
        replica = str(getattr(replica_id, "unique_id", None) or replica_id or replica)
    except Exception:  # not inside a replica (plain uvicorn, tests)
        pass
    return f"{replica}; pid={os.getpid()}"


class ReplicaHeaderMiddleware:
    """Add `X-Dropwise-Replica` to every HTTP answer (the identity is read once, in the replica)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._identity: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._identity is None:
            self._identity = replica_identity().encode("latin-1", "replace")
        identity = self._identity

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), identity)]}
            await send(message)

        await self.app(scope, receive, stamped)


def build_deployment(
    settings: Settings | None = None,
    *,
    num_replicas: int = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    name: str = "dropwise",
    health_check_period_s: float = 2.0,
) -> Any:
    """A bound Ray Serve application serving `create_app(settings)` on `num_replicas` replicas.

    `num_cpus` / `num_gpus` default to the settings `ray_cpus_per_replica` / `ray_gpus_per_replica`; with
    GPUs Ray places each replica on its own and the service's `device=auto` picks it up.
    """
    from ray import serve

    settings = settings or Settings()
    app = create_app(settings)
    app.add_middleware(ReplicaHeaderMiddleware)
    cpus = settings.ray_cpus_per_replica if num_cpus is None else num_cpus
    gpus = settings.ray_gpus_per_replica if num_gpus is None else num_gpus

    @serve.deployment(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=max(10.0, 5 * health_check_period_s),
    )
    @serve.ingress(app)
    class DropwiseDeployment:
        """One replica of the dropwise service (the app's lifespan loads the models)."""

    return DropwiseDeployment.bind()  # type: ignore[attr-defined]  # serve.deployment returns a Deployment


def run(settings: Settings, replicas: int) -> None:
    """Start a local Ray cluster and Serve on `settings.host:port` with `replicas` replicas; block until signalled.

    SIGTERM and SIGINT shut Serve and Ray down (exit status 0).
    """
    import ray
    from ray import serve

    def _stop(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs a handler of its own that aborts
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_deployment(settings, num_replicas=replicas), name="dropwise", route_prefix="/")
        print(
            f"dropwise: Ray Serve with {replicas} replica(s) on http://{settings.host}:{settings.port} "
            f"({settings.ray_cpus_per_replica:g} CPU, {settings.ray_gpus_per_replica:g} GPU each)",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
