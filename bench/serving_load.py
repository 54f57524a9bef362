"""The load generator of `bench.serving`: keep-alive clients on raw asyncio streams, latencies, server CPU."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def http_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 keep-alive POST, encoded once and replayed by every client."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc; else None)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    first_error: str = ""
    server_cpu_s: float | None = None  #: CPU time of the server's processes during the measured window

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


async def _client(
    port: int, request: bytes, warmup_end: float, stop: float, cap: int, out: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _exchange(reader, writer, request, warmup_end, stop, cap, out, errors)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        errors.append(f"connection: {exc!r}")
    finally:
        writer.close()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    warmup_end: float,
    stop: float,
    cap: int,
    out: list[float],
    errors: list[str],
) -> None:
    """Send ``request`` and read its answer until ``stop``; record latencies after ``warmup_end``."""
    while (now := time.perf_counter()) < stop and len(out) < cap:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        done = time.perf_counter()
        if status != 200:
            errors.append(f"{status}: {payload[:200].decode(errors='replace')}")
        elif now >= warmup_end:
            out.append((done - now) * 1000.0)


async def _cpu_window(pgid: int | None, warmup_end: float, stop: float) -> float | None:
    """Server CPU seconds spent between ``warmup_end`` and ``stop``."""
    if pgid is None:
        return None
    await asyncio.sleep(max(0.0, warmup_end - time.perf_counter()))
    start = group_cpu_seconds(pgid)
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    end = group_cpu_seconds(pgid)
    return None if start is None or end is None else end - start


async def _load(
    port: int, request: bytes, clients: int, warmup: float, duration: float, cap: int, pgid: int | None = None
) -> LoadResult:
    start = time.perf_counter()
    warmup_end = start + warmup
    stop = warmup_end + duration
    latencies: list[float] = []
    errors: list[str] = []
    cpu = asyncio.ensure_future(_cpu_window(pgid, warmup_end, stop))
    await asyncio.gather(*(_client(port, request, warmup_end, stop, cap, latencies, errors) for _ in range(clients)))
    measured = min(time.perf_counter(), stop) - warmup_end
    if not cpu.done():  # the run ended early (request cap or errors): no full window to charge
        cpu.cancel()
    server_cpu = cpu.result() if cpu.done() and not cpu.cancelled() else None
    return LoadResult(
        len(latencies), len(errors), measured, np.asarray(latencies), errors[0] if errors else "", server_cpu
    )


def run_load(port: int, request: bytes, args: argparse.Namespace, pgid: int | None = None) -> LoadResult:
    """Drive ``args.clients`` connections for warm-up plus duration seconds (at most ``max_requests``);
    with ``pgid``, also charge the CPU time of that server process group during the measured window."""
    load = _load(port, request, args.clients, args.warmup, args.duration, args.max_requests, pgid)
    try:  # uvloop (installed with uvicorn[standard] or litserve) keeps the load generator cheaper
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)
