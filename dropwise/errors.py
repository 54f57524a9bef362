"""The one error base of dropwise.

Every failure a user can cause (a bad path, a refused package, a model without sites, failed parity)
raises a subclass of :class:`DropwiseError`. The command line catches ``DropwiseError`` once and prints it
as one line (exit status 2); the service renders its own subclass, ``ServiceError``, through registered
exception handlers. Library callers can catch ``DropwiseError`` to handle all of them.
"""

from __future__ import annotations


class DropwiseError(Exception):
    """Base of every error dropwise raises for bad input or a refused operation."""


class UserError(DropwiseError):
    """An error in what the user asked the command line for: printed as one line, exit status 2."""


__all__ = ["DropwiseError", "UserError"]
