"""Dynamic batching per model version, as in Triton: max batch size, max queue delay, bounded queue.

One asyncio worker per model version takes requests off a bounded queue, waits up to the max queue delay
to fill a batch of at most `max_batch_size` rows, and runs the batch in a dedicated thread so the event
loop stays free. Deterministic requests of a batch share one forward pass; MC requests of a batch share
one trunk pass whatever their T (the runtime's `predict_mc`). A full queue answers 429 with Retry-After;
a request past its deadline answers 504, whether it is still queued or already computing, and an MC
computation stops between chunks once every request of its batch is past its deadline or gone (the
runtime calls the batch's `check`), so abandoned work does not hold the model's worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dropwise.service.errors import DeadlineExceeded, ModelNotReady, QueueFull
from dropwise.service.metrics import ServiceMetrics
from dropwise.service.model_inputs import ModelInputs, batch_rows, concat_rows
from dropwise.service.runtimes.base import MCGroup, Outputs, Runtime
from dropwise.service.settings import Settings
from dropwise.service.statistics import ModelStatistics
from dropwise.service.tracing import Trace, mark

log = logging.getLogger("dropwise.batcher")


class ComputationAbandoned(Exception):
    """Raised from a runtime's `check` callback: every request of the batch is past its deadline or gone."""


@dataclass(eq=False)
class Job:
    """One request's work: validated inputs, its mode, MC group and absolute deadline (monotonic clock)."""

    x: ModelInputs
    mode: str
    group: MCGroup | None
    deadline: float
    future: asyncio.Future[Outputs] | None = field(default=None, repr=False)
    enqueued: float = 0.0
    abandoned: bool = False
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0
    trace: Trace | None = field(default=None, repr=False)  #: `dropwise.service.tracing` timestamps

    @property
    def rows(self) -> int:
        """Number of examples this job carries."""
        return batch_rows(self.x)


class ModelBatcher:
    """The queue and worker of one model version."""

    def __init__(
        self, runtime: Runtime, settings: Settings, metrics: ServiceMetrics, *, name: str, version: int
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.name = name
        self.version = version
        self._queue: asyncio.Queue[Job] | None = None
        self._carry: collections.deque[Job] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False
        self._inflight: tuple[asyncio.Future[None], list[Job]] | None = None
        self._running = False
        #: Triton-style statistics of this version (executions are counted here, requests by the service)
        self.statistics: ModelStatistics | None = None
        # this model's metric children, looked up once (a `labels()` call per request costs a lock and a dict)
        self._queue_time = metrics.queue_time.labels(model=name)
        self._queue_depth = metrics.queue_depth.labels(model=name)
        self._mc_samples = metrics.mc_samples.labels(model=name)
        self._batch_size = {mode: metrics.batch_size.labels(model=name, mode=mode) for mode in ("deterministic", "mc")}

    @property
    def depth(self) -> int:
        """Requests waiting (queued or carried over to the next batch)."""
        return (self._queue.qsize() if self._queue else 0) + len(self._carry)

    @property
    def busy(self) -> bool:
        """True while requests wait or a batch runs (a retired version drains until this is False)."""
        return self._running or self.depth > 0

    def start(self) -> None:
        """Create the queue, the compute thread and the worker task (call from the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.settings.queue_capacity)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dropwise-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Cancel the worker and answer every waiting request with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        pending = list(self._carry)
        self._carry.clear()
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            self._fail(job, ModelNotReady(f"model {self.name!r} is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new requests and answer the queued ones 503 now; let the batch that is
        computing finish for at most `grace_s` seconds (past that its requests answer 503 as well)."""
        self._draining = True
        shutting_down = ModelNotReady(f"model {self.name!r}: the server is shutting down")
        pending = list(self._carry)
        self._carry.clear()
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            self._fail(job, shutting_down)
        self._set_depth()
        if self._inflight is not None:
            running, jobs = self._inflight
            try:
                await asyncio.wait_for(asyncio.shield(running), timeout=grace_s)
            except Exception:  # TimeoutError past the grace period, or the batch itself failed
                for job in jobs:
                    self._fail(job, shutting_down)

    def admit(self) -> None:
        """Raise `QueueFull` (429) when the queue is at capacity, `ModelNotReady` (503) when not running."""
        if self._queue is None or self._task is None or self._draining:
            raise ModelNotReady(f"model {self.name!r} is not running (or the server is shutting down)")
        if self._queue.full():
            raise self._queue_full()

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"model {self.name!r} has {self.settings.queue_capacity} requests waiting; retry later",
            retry_after=self.settings.retry_after_s,
        )

    async def submit(self, job: Job) -> Outputs:
        """Queue `job` and wait for its outputs; raises `QueueFull` (429) or `DeadlineExceeded` (504)."""
        if self._queue is None or self._task is None or self._draining:
            raise ModelNotReady(f"model {self.name!r} is not running (or the server is shutting down)")
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.enqueued = time.monotonic()
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise self._queue_full() from None
        self._set_depth()
        mark(job.trace, "enqueued")
        # One timer that fails the job's future at its deadline: `wait_for` (3.11) would wrap the future in a
        # task of its own, one more trip through the event loop's queue per request, and `asyncio.timeout`
        # costs a context manager and a reschedule. The worker and `_resolve` skip a future already done.
        timer = loop.call_at(loop.time() + max(job.deadline - time.monotonic(), 0.0), self._expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away
            job.abandoned = True
            raise
        finally:
            timer.cancel()

    def _expire(self, job: Job) -> None:
        """The job's deadline passed before its outputs came: answer 504 (the worker skips it from now)."""
        if job.future is not None and not job.future.done():
            job.abandoned = True
            job.future.set_exception(
                DeadlineExceeded(f"request to {self.name!r} was not answered within its deadline", field="timeout")
            )

    # ------------------------------------------------------------------ worker
    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry:
            return self._carry.popleft()
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[Job]:
        first = await self._next(None)
        assert first is not None
        self._running = True  # jobs held in a forming batch count as work in progress
        batch, rows = [first], first.rows
        fill_until = time.monotonic() + self.settings.max_queue_delay_ms / 1000.0
        while rows < self.settings.max_batch_size:
            job = await self._next(fill_until - time.monotonic())
            if job is None:
                break
            if rows + job.rows > self.settings.max_batch_size:
                self._carry.appendleft(job)
                break
            batch.append(job)
            rows += job.rows
        self._set_depth()
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = False  # idle until `_collect` takes a job
            batch = await self._collect()
            now = time.monotonic()
            now_perf = time.perf_counter()
            live: list[Job] = []
            for job in batch:
                if job.trace is not None:
                    job.trace["batch"] = now_perf
                job.queue_s = now - job.enqueued
                self._queue_time.observe(job.queue_s)
                if job.abandoned or (job.future is not None and job.future.done()):
                    continue
                if now >= job.deadline:
                    self._fail(job, DeadlineExceeded("deadline passed while queued", field="timeout"))
                    continue
                live.append(job)
            if not live:
                continue
            if self._draining:  # collected while the drain began: never started, so answer 503
                for job in live:
                    self._fail(job, ModelNotReady(f"model {self.name!r}: the server is shutting down"))
                continue
            running = loop.run_in_executor(self._executor, self._run_batch, live)
            self._inflight = (running, live)
            try:
                await running
            except Exception as exc:  # the executor itself failed (e.g. shut down)
                for job in live:
                    self._fail(job, exc)
            finally:
                self._inflight = None

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run one batch in the compute thread and resolve each job's future on the event loop."""
        deterministic = [job for job in jobs if job.mode != "mc"]
        mc = [job for job in jobs if job.mode == "mc"]
        for part, runner in ((deterministic, self._run_deterministic), (mc, self._run_mc)):
            if not part:
                continue
            try:
                self._timed(part, runner)
            except ComputationAbandoned:
                self.metrics.abandoned.labels(model=self.name).inc()
                log.info("%s: abandoned a batch of %d request(s) past their deadline", self.name, len(part))
                for job in part:
                    job.future.get_loop().call_soon_threadsafe(  # type: ignore[union-attr]
                        self._fail, job, DeadlineExceeded("deadline passed while computing", field="timeout")
                    )
            except Exception:
                if len(part) == 1:
                    self._fail_threadsafe(part[0])
                    continue
                # isolate the failing request: run each alone so one bad job cannot fail its neighbours
                for job in part:
                    try:
                        self._timed([job], runner)
                    except Exception:
                        self._fail_threadsafe(job)

    def _timed(self, jobs: list[Job], runner: Callable[[list[Job]], list[Outputs]]) -> None:
        start = time.perf_counter()
        outputs = runner(jobs)
        elapsed = time.perf_counter() - start
        if len(outputs) != len(jobs):  # checked here, where `_run_batch` isolates a failing batch
            raise RuntimeError(f"{self.name}: the runtime answered {len(outputs)} of {len(jobs)} requests")
        for job in jobs:
            if job.trace is not None:
                job.trace["compute_start"] = start
                job.trace["compute_end"] = start + elapsed
        rows = sum(job.rows for job in jobs)
        mode = jobs[0].mode
        (self._batch_size.get(mode) or self.metrics.batch_size.labels(model=self.name, mode=mode)).observe(rows)
        if self.statistics is not None:
            self.statistics.record_execution(rows, elapsed)
        for job in jobs:
            job.compute_s = elapsed
            job.batch_rows = rows
        # one wake-up of the event loop for the whole batch, not one per request
        loop = jobs[0].future.get_loop()  # type: ignore[union-attr]
        loop.call_soon_threadsafe(self._resolve_all, jobs, outputs)

    def _run_deterministic(self, jobs: list[Job]) -> list[Outputs]:
        x = concat_rows([job.x for job in jobs])
        out = self.runtime.predict_deterministic(x)
        results: list[Outputs] = []
        start = 0
        for job in jobs:
            stop = start + job.rows
            results.append({key: value[start:stop] for key, value in out.items()})
            start = stop
        return results

    def _run_mc(self, jobs: list[Job]) -> list[Outputs]:
        x = concat_rows([job.x for job in jobs])
        groups = [job.group for job in jobs]
        assert all(group is not None for group in groups)
        for job in jobs:
            assert job.group is not None
            self._mc_samples.observe(job.group.num_samples)

        def check() -> None:  # called by the runtime between chunks, in this compute thread
            now = time.monotonic()
            if all(job.abandoned or now >= job.deadline for job in jobs):
                raise ComputationAbandoned

        return self.runtime.predict_mc(x, groups, check)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ futures
    @classmethod
    def _resolve_all(cls, jobs: list[Job], outputs: list[Outputs]) -> None:
        for job, out in zip(jobs, outputs, strict=True):
            cls._resolve(job, out)

    def _fail_threadsafe(self, job: Job) -> None:
        log.exception("inference failed for model %s", self.name)
        assert job.future is not None
        exc = RuntimeError(f"inference failed for model {self.name!r}")
        job.future.get_loop().call_soon_threadsafe(self._fail, job, exc)

    @staticmethod
    def _resolve(job: Job, outputs: Outputs) -> None:
        mark(job.trace, "resolved")
        if job.future is not None and not job.future.done():
            job.future.set_result(outputs)

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        if job.future is not None and not job.future.done() and not job.abandoned:
            job.future.set_exception(exc)

    def _set_depth(self) -> None:
        self._queue_depth.set(self.depth)
