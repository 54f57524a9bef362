"""Which model versions are served, and how they change while the server runs (Triton's model control).

`ModelControl` owns the served versions of every model (`models`: name -> version -> `LoadedVersion`) and
brings them in line with the repository:

- at start, every model's versions chosen by its version policy (the package's `serving.version_policy`,
  default latest 1) are loaded, warmed up (one deterministic and one MC pass) and only then served;
- `DROPWISE_MODEL_CONTROL=poll` rescans the repository every `DROPWISE_POLL_INTERVAL_S` seconds and applies
  the same rule: a new version is loaded and warmed up beside the running one, then swapped in by one
  dictionary assignment on the event loop; versions no longer chosen are retired;
- `explicit` does the same for one model on `POST /v2/repository/models/{name}/load`, and retires every
  version on `.../unload`; `none` changes nothing after start (those routes answer 400).

Swaps lose no request. The service looks a version up and queues its request without yielding to the event
loop, so a request is either queued on the old version or looked up on the new one. A retired version keeps
answering what it queued (and requests that name it explicitly) until its queue is empty and no batch
runs; then it is stopped in the same event-loop step that makes it unreachable. A package that fails
verification (bad checksum, missing file, invalid manifest or serving configuration) or fails to load is
refused with a logged reason and listed by the repository index; the versions already served keep serving
(a served version whose files are damaged later keeps serving the copy verified when it was loaded; a
version whose directory is removed is retired).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from dropwise.package import PackageError, validate_name
from dropwise.package.serving import ServingConfig, VersionPolicy
from dropwise.service.batcher import ModelBatcher
from dropwise.service.errors import InvalidInput
from dropwise.service.heap import freeze_long_lived, thaw
from dropwise.service.metrics import ServiceMetrics
from dropwise.service.model_inputs import example_inputs
from dropwise.service.repository import ModelRepository
from dropwise.service.runtimes.base import MCGroup, PackageSpec, Runtime
from dropwise.service.settings import Settings
from dropwise.service.statistics import ModelStatistics

log = logging.getLogger("dropwise.model_control")

State = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
#: Retired versions remembered for `info()` (a request that ran on them can still be described).
_RETIRED_KEPT = 4
#: How often a retiring version checks whether its queue has drained.
_DRAIN_POLL_S = 0.005

__all__ = ["IndexEntry", "LoadedVersion", "ModelControl", "RepositoryControlError", "warm_up"]


class RepositoryControlError(InvalidInput):
    """A repository-control request that cannot be carried out (400, as Triton answers)."""


@dataclass
class LoadedVersion:
    """One served model version: its package, runtime, batcher, effective settings and statistics."""

    spec: PackageSpec
    runtime: Runtime
    batcher: ModelBatcher
    settings: Settings
    config: ServingConfig
    fingerprint: str
    statistics: ModelStatistics = field(default_factory=ModelStatistics)
    serving: bool = True
    #: seconds of the warm-up passes run before the version was served, by mode
    warm_up_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (Triton's `{name, version, state, reason}`)."""

    name: str
    version: int
    state: State
    reason: str = ""

    def to_json(self) -> dict[str, str]:
        """The JSON form Triton's index answers (version as a string)."""
        return {"name": self.name, "version": str(self.version), "state": self.state, "reason": self.reason}


def fingerprint(spec: PackageSpec) -> str:
    """A digest of a package version's manifest (file checksums and serving configuration included)."""
    text = json.dumps(spec.manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def serving_of(spec: PackageSpec) -> ServingConfig:
    """The serving configuration recorded in a package (validated when the repository was scanned)."""
    return ServingConfig.model_validate(spec.manifest.get("serving") or {})


def effective_settings(settings: Settings, config: ServingConfig) -> Settings:
    """The server's settings with the package's serving configuration laid over them."""
    return settings.model_copy(update=config.overrides())


def warm_up(runtime: Runtime) -> dict[str, float]:
    """One deterministic pass and, when the runtime has an MC path, one seeded MC pass on zeros.

    Returns the seconds each pass took, by mode (`deterministic`, `mc`).
    """
    spec = runtime.spec
    example = example_inputs(spec, rows=1)
    took: dict[str, float] = {}
    start = time.perf_counter()
    runtime.predict_deterministic(example)
    took["deterministic"] = time.perf_counter() - start
    if runtime.supports_mc:
        start = time.perf_counter()
        runtime.predict_mc(example, [MCGroup(rows=1, num_samples=2, seed=0)])
        took["mc"] = time.perf_counter() - start
    return took


class ModelControl:
    """The served versions of every model, and the rules that load, swap and retire them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, repository: ModelRepository) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        #: served versions: name -> version -> LoadedVersion (replaced whole on every change)
        self.models: dict[str, dict[int, LoadedVersion]] = {}
        #: versions draining their queue after a swap or unload (still answer what names them)
        self.retiring: dict[tuple[str, int], LoadedVersion] = {}
        #: recently retired versions, for describing answers they gave
        self.retired: collections.OrderedDict[tuple[str, int], LoadedVersion] = collections.OrderedDict()
        #: valid packages found by the last scan: name -> version -> spec
        self.found: dict[str, dict[int, PackageSpec]] = {}
        #: versions whose runtime failed to load: (name, version) -> (fingerprint, reason)
        self.failed: dict[tuple[str, int], tuple[str, str]] = {}
        self.loading: set[tuple[str, int]] = set()
        #: models unloaded on request (explicit mode); not loaded again until asked
        self.unloaded: set[str] = set()
        #: models that must serve a version for the server to be ready (found at start or loaded on request)
        self.expected: set[str] = set()
        self.started = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load every model's chosen versions; in poll mode start the repository watcher."""
        await self.reconcile_all()
        freeze_long_lived(collect=True)  # the loaded models and imports: out of the collector's way
        self.started = True
        if self.settings.model_control == "poll":
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="dropwise-poll")

    async def stop(self) -> None:
        """Stop the watcher and every batcher (waiting requests are answered 503)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        for task in list(self._drains):
            task.cancel()
        slots = [slot for versions in self.models.values() for slot in versions.values()]
        slots += list(self.retiring.values())
        self.models = {}
        self.retiring.clear()
        for slot in slots:
            slot.serving = False
            await slot.batcher.stop()
        self.started = False
        thaw()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.reconcile_all()
            except Exception:  # a scan that fails must not stop the watcher
                log.exception("repository poll failed")

    # ------------------------------------------------------------------ lookups
    def lookup(self, name: str, version: int | None) -> LoadedVersion | None:
        """The version a request goes to: latest served, or a named one (draining ones included)."""
        versions = self.models.get(name)
        if version is None:
            return versions[max(versions)] if versions else None
        if versions and version in versions:
            return versions[version]
        return self.retiring.get((name, version))

    def describe(self, name: str, version: int) -> LoadedVersion | None:
        """Like `lookup` for a named version, also finding recently retired versions."""
        return self.lookup(name, version) or self.retired.get((name, version))

    def ready(self) -> bool:
        """Started, something served, and every model found serves at least one version.

        A version loading beside a served one (a hot swap) does not make the server unready: the served
        version answers meanwhile.
        """
        return (
            self.started and bool(self.models) and all(self.models.get(name) for name in self.expected - self.unloaded)
        )

    def _refused_names(self) -> set[str]:
        return {key.split("/", 1)[0] for key in self.repository.errors}

    # ------------------------------------------------------------------ repository control
    async def reconcile_all(self) -> None:
        """Rescan the whole repository and bring every model not unloaded on request in line with it."""
        found = await self.rescan()
        self.expected = set(found) | self._refused_names()
        names = set(found) | set(self.models)
        for name in sorted(names - self.unloaded):
            await self._reconcile(name, found.get(name, {}))

    async def rescan(self) -> dict[str, dict[int, PackageSpec]]:
        """Scan the repository (verifying every package) without changing what is served."""
        self.found = await asyncio.to_thread(self.repository.scan)
        return self.found

    async def load(self, name: str) -> None:
        """Load (or reload) `name` from the repository by its version policy; 400 when nothing loads."""
        self._check_control("load")
        name = self._check_name(name)
        specs = await asyncio.to_thread(self.repository.scan_model, name)
        if specs:
            self.found[name] = specs
        else:
            self.found.pop(name, None)
        reasons = {k: v for k, v in self.repository.errors.items() if k.split("/", 1)[0] == name}
        if not specs:
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no version in the repository"
            raise RepositoryControlError(f"failed to load {name!r}: {detail}", field="model")
        self.unloaded.discard(name)
        self.expected.add(name)
        await self._reconcile(name, specs)
        if not self.models.get(name):
            failures = [f"{name}/{v}: {reason}" for (n, v), (_, reason) in self.failed.items() if n == name]
            raise RepositoryControlError(f"failed to load {name!r}: {'; '.join(failures)}", field="model")

    async def unload(self, name: str) -> None:
        """Retire every served version of `name` (its queued requests are still answered)."""
        self._check_control("unload")
        name = self._check_name(name)
        if name not in self.models and name not in self.found:
            raise RepositoryControlError(f"failed to unload {name!r}: unknown model", field="model")
        self.unloaded.add(name)
        async with self._lock(name):
            current = self.models.pop(name, {})
            for version, slot in current.items():
                self._retire(name, version, slot)
        log.info("unloaded %s (versions %s)", name, sorted(current))

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version in the repository or served, with its state and the reason when unavailable."""
        refused: dict[tuple[str, int], str] = {}
        for key, reason in self.repository.errors.items():
            model, _, version = key.partition("/")
            if version.isdigit():
                refused[(model, int(version))] = reason
        keys = set(refused) | {(n, v) for n, vs in self.found.items() for v in vs}
        keys |= {(n, v) for n, vs in self.models.items() for v in vs}
        keys |= set(self.loading) | set(self.retiring)
        entries = [self._entry(name, version, refused) for name, version in sorted(keys)]
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    def _entry(self, name: str, version: int, refused: dict[tuple[str, int], str]) -> IndexEntry:
        if version in self.models.get(name, {}):
            if (name, version) in refused:
                reason = f"serving the copy verified at load; the files on disk are refused: {refused[(name, version)]}"
                return IndexEntry(name, version, "READY", reason)
            return IndexEntry(name, version, "READY")
        if (name, version) in self.loading:
            return IndexEntry(name, version, "LOADING")
        if (name, version) in self.retiring:
            return IndexEntry(name, version, "UNLOADING", "draining its queue")
        if (name, version) in refused:
            return IndexEntry(name, version, "UNAVAILABLE", f"refused: {refused[(name, version)]}")
        if (name, version) in self.failed:
            return IndexEntry(name, version, "UNAVAILABLE", f"failed to load: {self.failed[(name, version)][1]}")
        if name in self.unloaded:
            return IndexEntry(name, version, "UNAVAILABLE", "unloaded")
        specs = self.found.get(name, {})
        policy = self._policy(specs)
        if version not in policy.select(list(specs)):
            return IndexEntry(name, version, "UNAVAILABLE", f"not chosen by the version policy ({policy.describe()})")
        waiting = {
            "poll": "new: served after the next repository poll",
            "explicit": "new: POST /v2/repository/models/{name}/load serves it",
            "none": "new: model control is none, a restart serves it",
        }[self.settings.model_control]
        return IndexEntry(name, version, "UNAVAILABLE", waiting.replace("{name}", name))

    # ------------------------------------------------------------------ internals
    def _check_control(self, action: str) -> None:
        mode = self.settings.model_control
        if mode != "explicit":
            raise RepositoryControlError(
                f"explicit model {action} is not allowed when model control is {mode!r}: "
                "start the server with DROPWISE_MODEL_CONTROL=explicit",
                field="model_control",
            )

    @staticmethod
    def _check_name(name: str) -> str:
        try:
            return validate_name(name)
        except PackageError as exc:
            raise RepositoryControlError(str(exc), field="model") from None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @staticmethod
    def _policy(specs: dict[int, PackageSpec]) -> VersionPolicy:
        """The version policy recorded in the newest valid version (latest 1 when none is recorded)."""
        return serving_of(specs[max(specs)]).version_policy if specs else VersionPolicy()

    async def _reconcile(self, name: str, specs: dict[int, PackageSpec]) -> None:
        async with self._lock(name):
            current = self.models.get(name, {})
            specs = dict(specs)
            for version, served in current.items():  # refused on disk now, but verified when it was loaded
                if version not in specs and f"{name}/{version}" in self.repository.errors:
                    specs[version] = served.spec
            wanted = self._policy(specs).select(list(specs))
            new: dict[int, LoadedVersion] = {}
            for version in wanted:
                spec = specs[version]
                digest = fingerprint(spec)
                slot = current.get(version)
                if slot is not None and slot.fingerprint == digest:
                    new[version] = slot
                    continue
                loaded = await self._load_version(spec, digest)
                if loaded is not None:
                    new[version] = loaded
                elif slot is not None:  # the changed package failed: the running one keeps serving
                    new[version] = slot
            if wanted and not new and current:
                log.error("%s: no chosen version loads; versions %s keep serving", name, sorted(current))
                return
            if new == current:
                return
            # the swap: one assignment, no await between it and the retirements
            if new:
                self.models[name] = new
            else:
                self.models.pop(name, None)
            for version, slot in current.items():
                if new.get(version) is not slot:
                    self._retire(name, version, slot)
            log.info("%s: serving versions %s (was %s)", name, sorted(new), sorted(current))
            if self.started:  # a version loaded while serving: freeze it too, without a full collection
                freeze_long_lived(collect=False)

    async def _load_version(self, spec: PackageSpec, digest: str) -> LoadedVersion | None:
        key = (spec.name, spec.version)
        previous = self.failed.get(key)
        if previous is not None and previous[0] == digest:
            return None  # the same package failed before: wait for a new one
        self.loading.add(key)
        started = time.perf_counter()
        try:
            config = serving_of(spec)
            runtime = await asyncio.to_thread(
                self.repository.load_runtime,
                spec,
                self.settings.backend,
                self.settings.device,
                mc_compile=self.settings.mc_compile,
            )
            warmed = await asyncio.to_thread(warm_up, runtime)
        except Exception as exc:  # a broken package must not take the others down
            log.exception("failed to load %s version %s", spec.name, spec.version)
            self.failed[key] = (digest, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.loading.discard(key)
        self.failed.pop(key, None)
        settings = effective_settings(self.settings, config)
        batcher = ModelBatcher(runtime, settings, self.metrics, name=spec.name, version=spec.version)
        statistics = ModelStatistics()
        batcher.statistics = statistics
        batcher.start()
        log.info(
            "loaded %s v%s: %s on %s (%s), warmed up in %.2f s",
            spec.name,
            spec.version,
            runtime.backend,
            runtime.device,
            runtime.provider,
            time.perf_counter() - started,
        )
        return LoadedVersion(
            spec=runtime.spec,
            runtime=runtime,
            batcher=batcher,
            settings=settings,
            config=config,
            fingerprint=digest,
            statistics=statistics,
            warm_up_s=warmed,
        )

    def _retire(self, name: str, version: int, slot: LoadedVersion) -> None:
        self.retiring[(name, version)] = slot
        task = asyncio.get_running_loop().create_task(self._drain(name, version, slot))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, name: str, version: int, slot: LoadedVersion) -> None:
        """Stop a retired version once its queue is empty and no batch runs (or its deadline passed)."""
        deadline = time.monotonic() + slot.settings.request_timeout_s + 5.0
        while slot.batcher.busy and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        key = (name, version)
        # unreachable and stopped in one step: nothing can be queued on it in between
        if self.retiring.get(key) is slot:
            del self.retiring[key]
        slot.serving = False
        self.retired[key] = slot
        while len(self.retired) > _RETIRED_KEPT:
            self.retired.popitem(last=False)
        await slot.batcher.stop()
        log.info("retired %s v%s", name, version)
