"""A CUDA stream per model's compute thread (torch only: no service imports, so checks can use it alone).

Every model version of the service runs its batches in one compute thread of its own. On CUDA that thread
issues its work on a stream of its own (`ComputeStream`): one model's result copy then waits only for its
own kernels, not for every other model's work on the shared default stream. Right by construction:

- the stream is entered with `torch.cuda.stream`, which sets the *calling thread's* current stream, so the
  input copy, every kernel and the result copy of a batch are ordered on it;
- the result copy to the host (`.cpu()`) synchronises that stream before the numpy result is read;
- memory allocated inside belongs to that stream in the caching allocator and is reused only on it;
- `ready()` makes the stream wait for work queued on the device's current stream by the thread that
  loaded the model (weights copied to the device), so the first batch never reads half-copied weights.

On the CPU there are no streams: `ComputeStream` holds None and entering it does nothing, so the same code
path runs on both devices.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class ComputeStream:
    """The stream one model's compute thread enters around each batch (a no-op on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = torch.cuda.Stream(device) if device.type == "cuda" else None

    def ready(self) -> None:
        """Order this stream after everything the current thread queued on `device` (e.g. loading)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def __call__(self) -> contextlib.AbstractContextManager[Any]:
        """Enter the stream for the calling thread; nothing on the CPU."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


__all__ = ["ComputeStream"]
