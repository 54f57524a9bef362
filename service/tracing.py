"""Per-request timing trace of the service, off unless `DROPWISE_TRACE_FILE` names a file.

Used to find where a request's time goes under load (the serving bench's tail). Each traced request
collects monotonic timestamps (`time.perf_counter`, seconds) at the steps it passes:

- ``arrival``: the request-context middleware sees the request (uvicorn has parsed its head);
- ``body``: the route has the whole body; ``parsed``: the body is decoded and validated;
- ``enqueued``: the job is in its model's queue; ``batch``: the worker formed the batch holding it;
- ``compute_start`` / ``compute_end``: the compute thread ran the batch;
- ``resolved``: the event loop delivered the job's outputs; ``encoded``: the answer body is built;
- ``sent``: the last byte of the answer was handed to uvicorn.

When the request ends, one JSON line ``{"rid", "path", "status", "t0", "t": {step: seconds}}`` is appended
to the file (steps relative to ``arrival`` at ``t0``). Garbage collections are traced too (one line
``{"gc": generation, "t0", "ms"}`` each), since a full collection stops every request at once. The
timestamps live in a dict in the ASGI scope; the batcher's job holds the same dict. With the variable unset,
`mark` costs one comparison with None.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import MutableMapping
from typing import IO, Any

TRACE_KEY = "dropwise.trace"
#: the steps of an answered inference request, in order
STEPS = (
    "arrival",
    "body",
    "parsed",
    "enqueued",
    "batch",
    "compute_start",
    "compute_end",
    "resolved",
    "encoded",
    "sent",
)
#: the file traced requests are appended to (None: tracing off)
TRACE_FILE: str | None = os.environ.get("DROPWISE_TRACE_FILE") or None

Trace = dict[str, float]

_lock = threading.Lock()
_sink: IO[str] | None = None


def start(scope: MutableMapping[str, Any]) -> Trace | None:
    """Begin the trace of one request (None when tracing is off)."""
    if TRACE_FILE is None:
        return None
    trace: Trace = {"arrival": time.perf_counter()}
    scope[TRACE_KEY] = trace
    return trace


def of(scope: MutableMapping[str, Any]) -> Trace | None:
    """The trace of the request `scope` belongs to (None when tracing is off)."""
    trace = scope.get(TRACE_KEY)
    return trace if isinstance(trace, dict) else None


def mark(trace: Trace | None, step: str) -> None:
    """Record that the request reached `step` now (nothing when `trace` is None)."""
    if trace is not None:
        trace[step] = time.perf_counter()


def finish(trace: Trace, **fields: Any) -> None:
    """Append the finished trace as one JSON line to `TRACE_FILE`."""
    if TRACE_FILE is None:
        return
    origin = trace.get("arrival", 0.0)
    _write(json.dumps({**fields, "t": {step: round(t - origin, 6) for step, t in trace.items()}, "t0": origin}))


def _write(line: str) -> None:
    global _sink
    with _lock:
        if _sink is None:
            _sink = open(TRACE_FILE or os.devnull, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        _sink.write(line + "\n")


_gc_started = 0.0


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        elapsed = time.perf_counter() - _gc_started
        _write(json.dumps({"gc": info.get("generation"), "t0": _gc_started, "ms": round(elapsed * 1000.0, 3)}))


if TRACE_FILE is not None:
    gc.callbacks.append(_on_gc)


def flush() -> None:
    """Write out what the file buffer holds (called when the app shuts down)."""
    with _lock:
        if _sink is not None:
            _sink.flush()


__all__ = ["STEPS", "TRACE_FILE", "TRACE_KEY", "Trace", "finish", "flush", "mark", "of", "start"]
