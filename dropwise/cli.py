"""The `dropwise` command line: one Typer app, each subcommand in its own module.

Subcommands are registered from small modules (`dropwise.commands.*`, `dropwise.commands.serve`) so that each part owns
its command. Errors a user can cause (bad path, bad name, failed parity) exit non-zero with one line on
stderr, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from dropwise.commands import convert, evaluate, export_triton, inspect, rewrite, serve, train
from dropwise.errors import DropwiseError, UserError

app = typer.Typer(
    name="dropwise",
    help="Model surgery around the dropout family, ONNX export, and an MC-dropout prediction service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Model surgery around the dropout family, ONNX export, and an MC-dropout prediction service."""


# each module defines `register(app: typer.Typer) -> None`
COMMAND_MODULES = (train, inspect, rewrite, convert, evaluate, serve, export_triton)


def _register_all() -> None:
    for module in COMMAND_MODULES:
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every ``DropwiseError`` and usage error ends as one line on stderr."""
    _register_all()
    try:
        result = app(args=argv, standalone_mode=False)
    except DropwiseError as exc:
        print(f"dropwise: error: {exc}", file=sys.stderr)
        return 2
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"dropwise: error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        print("dropwise: aborted", file=sys.stderr)
        return 1
    # with standalone_mode=False click returns the code of a `typer.Exit` instead of raising it
    return result if isinstance(result, int) else 0


__all__ = ["DropwiseError", "UserError", "app", "main"]

if __name__ == "__main__":
    sys.exit(main())
