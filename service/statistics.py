"""Per-model-version inference statistics in the shape of Triton's statistics extension.

`GET /v2/models/{m}/stats` answers `{"model_stats": [...]}` as Triton does, so `tritonclient`'s
`get_inference_statistics` reads it. Every request that reaches the inference service for a loaded model
version is counted, from the native API and the V2 API alike: `success` / `fail` (count and total
nanoseconds from validation to answer), `queue` and `compute_infer` (nanoseconds); `inference_count` counts
inferred rows and `execution_count` batched executions, with `batch_stats` per executed batch size.
Counters live in memory and start at zero each time a version is loaded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelStatistics"]


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStatistics:
    """Counters of one model version; safe to update from the event loop and the compute thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_infer = _Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, _Duration] = {}

    def record_request(self, ok: bool, seconds: float, queue_s: float = 0.0, compute_s: float = 0.0) -> None:
        """Count one answered request (`ok`: 200) with its total, queue and compute time."""
        with self._lock:
            (self.success if ok else self.fail).add(seconds)
            if ok:
                self.queue.add(queue_s)
                self.compute_infer.add(compute_s)
                self.last_inference_ms = int(time.time() * 1000)

    def record_execution(self, rows: int, seconds: float) -> None:
        """Count one batched execution of `rows` rows that took `seconds`."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += rows
            self._batches.setdefault(rows, _Duration()).add(seconds)

    def to_triton(self, name: str, version: int) -> dict[str, Any]:
        """One entry of Triton's `model_stats` list."""
        zero = _Duration().to_json()
        with self._lock:
            return {
                "name": name,
                "version": str(version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_json(),
                    "fail": self.fail.to_json(),
                    "queue": self.queue.to_json(),
                    "compute_input": zero,
                    "compute_infer": self.compute_infer.to_json(),
                    "compute_output": zero,
                    "cache_hit": zero,
                    "cache_miss": zero,
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": zero,
                        "compute_infer": duration.to_json(),
                        "compute_output": zero,
                    }
                    for size, duration in sorted(self._batches.items())
                ],
            }
