"""`dropwise serve`: start the prediction service with uvicorn.

The port listens within a second of the start: uvicorn serves a `dropwise.service.startup.StartupGate`
that answers `/healthz` at once and `/readyz` 503 naming what it waits for, while the first-start work,
the service's imports and the loading of every model run behind it.

With no `--repository` it serves the default `./model_repository`; when that holds no package yet, the
reference networks are trained into it first (with progress bars), so `dropwise serve` alone gives a
working service. Another repository is trained into only with `--train-if-empty`
(`DROPWISE_TRAIN_IF_EMPTY=1`, as the container image sets); otherwise an empty one is refused with one
line saying what to mount or pass. With the ONNX Runtime backend, packages without `model.onnx` are
converted at start when the repository is writable, and refused with the reason when it is not. A start
that fails (training, conversion, no CUDA GPU for `--device cuda`, the service's import) stops the server
with one line and exit status 2. Every option can also come from a `DROPWISE_*` environment variable (see
`dropwise.service.settings.Settings`); a flag given on the command line wins.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dropwise.service.settings import DEFAULT_REPOSITORY, Settings


def _has_packages(repository: Path) -> bool:
    """Whether `repository` holds at least one `<model>/<version>/manifest.json`.

    A cheap look at the file tree (no torch import), so the port listens at once; the service's scan
    verifies each package.
    """
    return repository.is_dir() and any(repository.glob("*/[0-9]*/manifest.json"))


def ensure_default_repository(
    repository: Path, *, backend: str = "torch", quick: bool = False, progress: bool = True
) -> None:
    """Train the reference networks into `repository` when it holds no package (first start).

    For the ONNX Runtime backend, packages without `model.onnx` are converted (both ONNX graphs and the
    parity report) first; the torch backend needs no conversion, so its first start skips that step.
    """
    if not _has_packages(repository):
        _train_default(repository, quick=quick, progress=progress)
    if backend == "onnxruntime":
        _export_onnx(repository)


def _train_default(repository: Path, *, quick: bool, progress: bool) -> None:
    from dropwise.zoo_training import train_zoo

    print(
        f"dropwise: no model packages in {repository}; training the reference networks there "
        f"({'quick' if quick else 'full'} recipes, first start only)...",
        file=sys.stderr,
        flush=True,
    )
    repository.mkdir(parents=True, exist_ok=True)
    for path in train_zoo(None, repository, quick=quick, progress=progress):
        print(f"dropwise: wrote {path}", file=sys.stderr, flush=True)


def _missing_onnx(repository: Path) -> list[str]:
    """Models whose latest package lists no `model.onnx` (the ONNX Runtime backend cannot serve them).

    Reads the manifests as JSON (no torch import); the service's scan verifies them.
    """
    missing = []
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [int(v.name) for v in model.iterdir() if v.name.isdigit() and (v / "manifest.json").is_file()]
        if not versions:
            continue
        try:
            files = json.loads((model / str(max(versions)) / "manifest.json").read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):  # a broken package is reported by the service's scan
            continue
        if "model.onnx" not in files:
            missing.append(model.name)
    return missing


def first_start_work(
    repository: Path, *, backend: str, train: bool, quick: bool
) -> tuple[Callable[[], None] | None, str]:
    """What must happen before the service can load `repository`, as a callable and a few words for
    `/readyz` (None when nothing does). Raises `UserError` at once for what no waiting can fix: an empty
    repository that may not be trained into, or one this process cannot write to."""
    from dropwise.errors import UserError

    empty = not repository.exists() or not _has_packages(repository)
    if empty and not train:
        raise UserError(
            f"no model packages in {repository} (expected <repository>/<model>/<version>/manifest.json): "
            "mount or pass a trained repository (dropwise train -r DIR), or allow first-start training "
            "with --train-if-empty (DROPWISE_TRAIN_IF_EMPTY=1)"
        )
    convert = backend == "onnxruntime" and (empty or bool(_missing_onnx(repository)))
    if not (empty or convert):
        return None, ""
    writable_dir = repository if repository.exists() else repository.parent
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        if empty:
            raise UserError(
                f"{repository} is empty and not writable by this process (uid {os.getuid()}): mount a trained "
                "repository, or a writable directory to train the reference networks into"
            )
        names = ", ".join(_missing_onnx(repository))
        print(
            f"dropwise: {repository} is read-only, so {names} cannot be converted to ONNX here and will not "
            "be served by the onnxruntime backend (run dropwise convert on them, or use --backend torch)",
            file=sys.stderr,
            flush=True,
        )
        return None, ""

    def work() -> None:
        ensure_default_repository(repository, backend=backend, quick=quick)

    if empty:
        what = f"training the reference networks into {repository} (first start)"
        return work, what + (" and converting them to ONNX" if backend == "onnxruntime" else "")
    return work, f"converting {', '.join(_missing_onnx(repository))} to ONNX (onnxruntime backend)"


def _export_onnx(repository: Path) -> None:
    """Add both ONNX graphs (and the parity report) to the latest packages that lack `model.onnx`."""
    try:
        from dropwise.surgery.convert import convert_package
    except ImportError:  # the torch backend serves the packages without them
        return
    from dropwise.package import list_models, load_package, package_path

    for name in list_models(repository):
        path = package_path(repository, name)
        try:
            if "model.onnx" in load_package(path, build=False).manifest.files:
                continue
            print(f"dropwise: exporting {name} to ONNX (first start with this backend)", file=sys.stderr)
            report = convert_package(path)
        except Exception as exc:  # the torch backend still serves the package
            print(f"dropwise: ONNX export of {name} failed ({exc}); torch backend only", file=sys.stderr)
            continue
        if not getattr(report, "passed", True):
            print(f"dropwise: ONNX parity of {name} failed; see its parity.json", file=sys.stderr)


def build_settings(**flags: Any) -> Settings:
    """Settings from the environment, overridden by the command-line flags that were given."""
    from pydantic import ValidationError

    from dropwise.errors import UserError

    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid settings: {problems}") from None


def serve(
    repository: Annotated[
        Path | None,
        typer.Option("--repository", "-r", help="Model repository (default ./model_repository, trained if empty)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (env DROPWISE_HOST; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env DROPWISE_PORT; default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (env DROPWISE_DEVICE; default auto).")] = None,
    backend: Annotated[
        str | None, typer.Option(help="torch | onnxruntime (env DROPWISE_BACKEND; default torch).")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Rows per batch (env DROPWISE_MAX_BATCH_SIZE).")] = None,
    max_queue_delay_ms: Annotated[
        float | None, typer.Option(help="Longest wait to fill a batch (env DROPWISE_MAX_QUEUE_DELAY_MS).")
    ] = None,
    quick_train: Annotated[
        bool, typer.Option("--quick-train", help="First start: train the default networks in seconds (demo).")
    ] = False,
    train_if_empty: Annotated[
        bool,
        typer.Option(
            "--train-if-empty",
            envvar="DROPWISE_TRAIN_IF_EMPTY",
            help="Train the reference networks into an empty --repository (always done for the default one).",
        ),
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve on Ray Serve (replicated app; DROPWISE_RAY_GPUS_PER_REPLICA, DROPWISE_RAY_CPUS_PER_REPLICA).",
        ),
    ] = False,
    replicas: Annotated[
        int | None, typer.Option("--replicas", min=1, max=1024, help="Ray Serve replicas (with --ray; default 1).")
    ] = None,
    allow_unauthenticated: Annotated[
        bool | None,
        typer.Option(
            "--allow-unauthenticated",
            help="Bind a non-loopback address without DROPWISE_API_TOKEN (env DROPWISE_ALLOW_UNAUTHENTICATED=1).",
        ),
    ] = None,
) -> None:
    """Serve deterministic and MC-dropout predictions over HTTP (native /v1 API and Open Inference /v2)."""
    from dropwise.errors import UserError
    from dropwise.service.server import GracefulServer, build_server, check_bind
    from dropwise.service.startup import StartupGate

    settings = build_settings(
        repository=repository,
        host=host,
        port=port,
        device=device,
        backend=backend,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        allow_unauthenticated=allow_unauthenticated or None,
    )
    check_bind(settings)  # before any training or loading: an open non-loopback bind needs consent
    repo = settings.repository
    if repo.exists() and not repo.is_dir():
        raise UserError(f"repository {repo} is not a directory")
    default = repository is None and repo == DEFAULT_REPOSITORY
    prepare, preparing = first_start_work(
        repo, backend=settings.backend, train=default or train_if_empty, quick=quick_train
    )

    if replicas is not None and not ray:
        raise UserError("--replicas needs --ray (one uvicorn process serves without Ray)")
    if ray:
        from dropwise.service.ray_serve import run as run_ray

        if prepare is not None:
            print(f"dropwise: {preparing}", file=sys.stderr, flush=True)
            prepare()
        run_ray(settings, replicas or 1)
        return

    def check_device() -> None:
        """`--device cuda` without a GPU fails before any training (it imports torch: behind the gate)."""
        if settings.device == "cuda" and settings.backend == "torch":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: torch sees no CUDA GPU (use --device auto or cpu)")

    def first_start() -> None:
        check_device()
        if prepare is not None:
            prepare()

    def build() -> Any:
        """Import the service (torch, FastAPI) and build the app; runs behind the gate."""
        from dropwise.service.app import create_app

        return create_app(settings)

    failures: list[str] = []
    server: GracefulServer | None = None

    def stop(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    gate = StartupGate(build, prepare=first_start, preparing=preparing or "checking the device", on_failure=stop)

    async def drain(grace_s: float) -> None:
        """SIGTERM: queued requests answer 503, the computing batch finishes within the grace period."""
        app = gate.app
        if app is not None:
            await app.state.inference.drain(grace_s)  # type: ignore[attr-defined]

    server = build_server(gate, settings, drain)  # graceful shutdown on SIGTERM, exit status 0
    print(
        f"dropwise: serving {repo} on http://{settings.host}:{settings.port} (docs at /docs; /readyz says "
        "when every model is loaded)",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    if failures:
        raise UserError(f"start-up failed: {failures[0]}")


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `dropwise` command line."""
    app.command("serve")(serve)
