"""`dropwise serve`: start the prediction service with uvicorn.

With no `--repository` it serves the default `./model_repository`; when that holds no package yet, the
reference networks are trained into it first (with progress bars), so `dropwise serve` alone gives a
working service. Every option can also come from a `DROPWISE_*` environment variable (see
`dropwise.service.settings.Settings`); a flag given on the command line wins.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dropwise.service.settings import DEFAULT_REPOSITORY, Settings


def _has_packages(repository: Path) -> bool:
    from dropwise.package import list_models

    return bool(list_models(repository))


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
) -> None:
    """Serve deterministic and MC-dropout predictions over HTTP (native /v1 API and Open Inference /v2)."""
    import uvicorn

    from dropwise.errors import UserError
    from dropwise.service.app import create_app

    settings = build_settings(
        repository=repository,
        host=host,
        port=port,
        device=device,
        backend=backend,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
    )
    repo = settings.repository
    if repo.exists() and not repo.is_dir():
        raise UserError(f"repository {repo} is not a directory")
    if repository is None and repo == DEFAULT_REPOSITORY:
        ensure_default_repository(repo, backend=settings.backend, quick=quick_train)
    elif not _has_packages(repo):
        raise UserError(f"no model packages in {repo} (expected <repository>/<model>/<version>/manifest.json)")
    if settings.device == "cuda" and settings.backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA GPU (use --device auto or cpu)")
    app = create_app(settings)
    print(f"dropwise: serving {repo} on http://{settings.host}:{settings.port} (docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `dropwise` command line."""
    app.command("serve")(serve)
