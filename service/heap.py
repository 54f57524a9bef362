"""Keep Python's cyclic garbage collector off the long-lived heap of a serving process.

A loaded service holds millions of long-lived objects (torch, FastAPI, pydantic, the models). Python's
full (generation 2) collection walks all of them: under the serving bench's load one ran every 3 s and
stopped every request for 0.4-0.56 s on the loaded development machine, which was the service's whole
latency tail (``python -m bench.serving_trace``). `freeze_long_lived` moves every object alive now into
the collector's permanent generation (`gc.freeze`), so later collections only walk what requests allocate.
Frozen objects are still freed by reference counting; only cycles among them are never collected.
"""

from __future__ import annotations

import gc


def freeze_long_lived(*, collect: bool) -> None:
    """Collect (when `collect`) and then freeze every object alive now (see the module docstring).

    `collect=True` once after start-up, when a pause costs nothing; `False` after a hot swap under load,
    where a full collection would stall the requests in flight.
    """
    if collect:
        gc.collect()
    gc.freeze()


def thaw() -> None:
    """Give the frozen objects back to the collector (when the service stops, so a process that built
    several apps, such as a test run, can still free their cycles)."""
    gc.unfreeze()


__all__ = ["freeze_long_lived", "thaw"]
