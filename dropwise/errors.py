"""Errors a user can cause from the command line: printed as one line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: `dropwise` prints it as one line and exits with status 2."""


__all__ = ["UserError"]
