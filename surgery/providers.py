"""ONNX Runtime execution providers: choose one, open a session, report the provider that really runs.

ONNX Runtime takes a list of providers in preference order and silently drops any it cannot load: with
`onnxruntime-gpu` installed but the CUDA or cuDNN libraries missing (or no GPU), a session asked for
`CUDAExecutionProvider` runs on the CPU without an error (docs/DESIGN.md §6). This module therefore compares
`session.get_providers()` with what was requested and reports the provider that actually runs.

`device` is one of ``auto`` (CUDA when the provider is built in and a GPU is present, CPU otherwise),
``cpu``, or ``cuda`` (an error when CUDA cannot be used, never a silent fallback). A CUDA session gets the
MC hash in ops the CUDA provider implements (`dropwise.surgery.onnx_cuda`), a static count of the nodes it
would still leave to the CPU (``ProviderInfo.placement``) and TF32 off unless asked.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from dropwise.errors import DropwiseError

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_DEVICE_OF_PROVIDER = {CPU_PROVIDER: "cpu", CUDA_PROVIDER: "cuda", "TensorrtExecutionProvider": "cuda"}


class ProviderError(DropwiseError, RuntimeError):
    """The requested device cannot be used (for example ``cuda`` without a working CUDA provider)."""


@dataclass(frozen=True)
class ProviderInfo:
    """What was asked of ONNX Runtime and what it actually runs on (shown by the service and in reports)."""

    device_requested: str
    providers_requested: tuple[str, ...]
    providers_active: tuple[str, ...]
    provider: str
    device: str
    fell_back: bool
    available: tuple[str, ...]
    package: str
    onnxruntime_version: str
    notes: tuple[str, ...] = field(default=())
    providers_missing: tuple[str, ...] = field(default=())
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    placement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def installed_packages() -> tuple[str, ...]:
    """The ONNX Runtime distributions installed (``onnxruntime``, ``onnxruntime-gpu``; both = broken)."""
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return tuple(found)


def gpu_count() -> int:
    """Number of NVIDIA GPUs the CUDA driver sees (0 without a driver), asked of libcuda directly.

    This does not need a CUDA build of torch: a CPU torch next to onnxruntime-gpu is a valid setup.
    """
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def cuda_usable() -> tuple[bool, str]:
    """Whether a CUDA session can be attempted, and why not when it cannot."""
    if CUDA_PROVIDER not in ort.get_available_providers():
        packages = installed_packages()
        if "onnxruntime-gpu" not in packages:
            return False, "onnxruntime-gpu is not installed (install the `gpu` extra instead of `cpu`)"
        return False, "this ONNX Runtime build has no CUDAExecutionProvider"
    if gpu_count() == 0:
        return False, "no NVIDIA GPU is visible to the CUDA driver"
    return True, ""


def resolve_providers(device: str = "auto") -> tuple[list[str], list[str]]:
    """The provider list to request for `device`, plus notes explaining the choice.

    Raises:
        ProviderError: `device` is unknown, or ``cuda`` is requested but cannot be used.
    """
    if device not in DEVICES:
        raise ProviderError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU_PROVIDER], []
    usable, reason = cuda_usable()
    if device == "cuda":
        if not usable:
            raise ProviderError(f"device 'cuda' requested but unavailable: {reason}")
        return [CUDA_PROVIDER, CPU_PROVIDER], []
    if usable:
        return [CUDA_PROVIDER, CPU_PROVIDER], []
    return [CPU_PROVIDER], [f"using CPU: {reason}"]


def describe_session(
    session: ort.InferenceSession,
    device_requested: str,
    providers_requested: list[str],
    notes: list[str],
    placement: dict[str, Any] | None = None,
) -> ProviderInfo:
    """Compare what a session runs on with what was requested; detect the silent CPU fallback.

    Every requested provider is checked (not only the first): one that ONNX Runtime dropped is listed in
    ``providers_missing`` with a note, and ``fell_back`` is True when the preferred one is among them.
    """
    active = tuple(session.get_providers())
    primary = active[0] if active else CPU_PROVIDER
    missing = tuple(p for p in providers_requested if p not in active)
    fell_back = bool(providers_requested) and primary != providers_requested[0]
    notes = list(notes)
    for name in missing:
        notes.append(
            f"ONNX Runtime was asked for {name} but runs on {', '.join(active) or 'nothing'} "
            "(CUDA/cuDNN libraries missing or incompatible)"
        )
    packages = installed_packages()
    if len(packages) > 1:
        notes.append("both onnxruntime and onnxruntime-gpu are installed: they overwrite each other")
    options = session.get_provider_options()
    return ProviderInfo(
        device_requested=device_requested,
        providers_requested=tuple(providers_requested),
        providers_active=active,
        provider=primary,
        device=_DEVICE_OF_PROVIDER.get(primary, "other"),
        fell_back=fell_back,
        available=tuple(ort.get_available_providers()),
        package="+".join(packages) or "unknown",
        onnxruntime_version=ort.__version__,
        notes=tuple(notes),
        providers_missing=missing,
        provider_options={k: dict(v) for k, v in options.items() if k != CPU_PROVIDER},
        placement=placement,
    )


def cuda_provider_options(tf32: bool = False) -> dict[str, str]:
    """CUDA provider options with the precision explicit: TF32 off unless asked (ONNX Runtime's default is on).

    TF32 rounds matmul / convolution inputs to 10 mantissa bits (relative error about 1e-3 per product);
    parity checks at 1e-5 need it off.
    """
    return {"use_tf32": "1" if tf32 else "0"}


def create_session(
    model: str | Path | bytes,
    device: str = "auto",
    session_options: ort.SessionOptions | None = None,
    *,
    tf32: bool = False,
    strict_placement: bool = False,
) -> tuple[ort.InferenceSession, ProviderInfo]:
    """Open an ONNX Runtime session on `device` and report the provider that actually runs.

    On CUDA the graph's bitwise nodes (the MC hash) are first rewritten into integer arithmetic the CUDA
    provider implements (`dropwise.surgery.onnx_cuda.cuda_compatible`, bit-identical), the static count of
    nodes left without a CUDA kernel is reported in ``ProviderInfo.placement``, TF32 is off unless ``tf32``,
    and ``strict_placement`` makes ONNX Runtime refuse the session rather than place a node on the CPU
    (``session.disable_cpu_ep_fallback``).

    Raises:
        ProviderError: ``cuda`` was requested and the session would not run on CUDA (no silent fallback).
    """
    providers, notes = resolve_providers(device)
    source: str | bytes = model if isinstance(model, bytes) else str(model)
    placement: dict[str, Any] | None = None
    requested: list[Any] = list(providers)
    if CUDA_PROVIDER in providers:
        import onnx

        from .onnx_cuda import BITWISE_OPS, cuda_compatible
        from .onnx_cuda import placement as count_placement

        proto = onnx.load_model_from_string(source) if isinstance(source, bytes) else onnx.load(source)
        rewritten = sum(node.op_type in BITWISE_OPS for node in proto.graph.node)
        if rewritten:
            proto = cuda_compatible(proto)
            source = proto.SerializeToString()
        placement = {**count_placement(proto).to_dict(), "bitwise_nodes_rewritten": rewritten}
        requested = [(CUDA_PROVIDER, cuda_provider_options(tf32)), CPU_PROVIDER]
        if strict_placement:
            session_options = session_options or ort.SessionOptions()
            session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    session = ort.InferenceSession(source, sess_options=session_options, providers=requested)
    info = describe_session(session, device, providers, notes, placement)
    if device == "cuda" and info.fell_back:
        raise ProviderError(
            f"device 'cuda' requested but ONNX Runtime runs on {info.provider} "
            "(CUDA/cuDNN libraries missing or incompatible)"
        )
    return session, info
