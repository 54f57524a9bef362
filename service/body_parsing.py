"""Parse request bodies without holding up the event loop.

JSON parsing of a large body is one long C call that holds the GIL (an 8 MiB native body: 0.4-0.7 s on the
development machine), so a worker *thread* does not free the event loop: `/healthz` still waits. Bodies up
to `THREAD_BYTES` are parsed inline, bodies up to `PROCESS_BYTES` in a thread (short GIL holds), larger ones
in a separate process (`ParsingPool`: one spawned worker, started on first use, importing only numpy,
pydantic and this module's light dependencies). Only the decoded result travels back (numpy arrays pickle
as one buffer copy).

This module imports neither torch nor the rest of the service, so the parsing process starts quickly.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
from dropwise.service.errors import InvalidInput
from dropwise.service.schemas import PredictRequest
from pydantic import ValidationError

T = TypeVar("T")
log = logging.getLogger("dropwise.body_parsing")

#: bodies larger than this are parsed off the event loop (thread)
THREAD_BYTES = 256 * 1024
#: bodies larger than this are parsed in the parsing process
PROCESS_BYTES = 1024 * 1024


class BodyValidationFailed(Exception):
    """The body does not match the route's schema; `errors` are pydantic's (without the offending input)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _holds_boolean(value: Any) -> bool:
    """Whether nested lists hold a JSON boolean anywhere (numpy would silently read `true` as 1.0)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def as_numeric_array(inputs: Any, *, field_name: str = "inputs", check_booleans: bool = True) -> np.ndarray:
    """Nested lists (decoded JSON) -> a numpy array, refusing booleans and ragged rows with `InvalidInput`.

    An ndarray passes through unchanged (a boolean array is refused). `check_booleans=False` skips the walk
    over every element (callers pass it when the raw JSON text holds no `true`/`false` token at all).
    """
    if isinstance(inputs, np.ndarray):
        x = inputs
    else:
        if check_booleans and _holds_boolean(inputs):
            raise InvalidInput("inputs must be numbers; true/false are not accepted", field=field_name)
        try:
            x = np.asarray(inputs)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"inputs are not a rectangular numeric array: {exc}", field=field_name) from None
    if x.dtype.kind == "b":
        raise InvalidInput("inputs must be numbers; true/false are not accepted", field=field_name)
    return x


def parse_predict(raw: bytes) -> tuple[PredictRequest, np.ndarray | dict[str, np.ndarray]]:
    """A native predict body -> (the validated request without its inputs, the inputs as arrays: one, or
    one per name for a model with several named inputs).

    Raises `BodyValidationFailed` (422) or `InvalidInput` (400: booleans, ragged rows).
    """
    try:
        body = PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise BodyValidationFailed([dict(e) for e in errors]) from None
    # JSON booleans can only hide in the inputs when the text holds a `true` or `false` token at all
    maybe_booleans = b"true" in raw or b"false" in raw
    inputs: np.ndarray | dict[str, np.ndarray]
    if isinstance(body.inputs, dict):  # several named inputs
        inputs = {
            name: as_numeric_array(value, field_name=f"inputs.{name}", check_booleans=maybe_booleans)
            for name, value in body.inputs.items()
        }
    else:
        inputs = as_numeric_array(body.inputs, check_booleans=maybe_booleans)
    body.inputs = []  # travels back as the arrays only
    return body, inputs


class ParsingPool:
    """One spawned process that parses large bodies; `run` picks inline, thread or process by size."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._process_ok = True  #: False once the process could not start (then threads are used)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._executor

    async def run(self, fn: Callable[..., T], raw: bytes, *args: Any) -> T:
        """`fn(raw, *args)` inline, in a thread or in the parsing process, by the size of `raw`.

        `fn` must be a module-level function and its result picklable (it may run in the other process).
        """
        if len(raw) <= THREAD_BYTES:
            return fn(raw, *args)
        if len(raw) <= PROCESS_BYTES or not self._process_ok:
            return await asyncio.to_thread(fn, raw, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, raw, *args)
        except (BrokenProcessPool, RuntimeError):
            # e.g. a host script without the `if __name__ == "__main__":` guard that spawn needs
            log.warning("body-parsing process unavailable; parsing large bodies in a thread", exc_info=True)
            self._process_ok = False
            self.shutdown()
            return await asyncio.to_thread(fn, raw, *args)

    def shutdown(self) -> None:
        """Stop the parsing process (if it was started)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


__all__ = [
    "PROCESS_BYTES",
    "THREAD_BYTES",
    "BodyValidationFailed",
    "ParsingPool",
    "as_numeric_array",
    "parse_predict",
]
