"""A fused CPU kernel for the counter-based dropout masks, with the pure-torch path as its fallback.

The masks of `dropwise.surgery.masks` (Salmon et al. 2011's counter-based idea with Wellons' ``lowbias32``
hash) cost a dozen element-wise torch passes per 32-bit word when built from torch ops, each pass reading
and writing the whole mask: about 5 ns per mask decision at one thread. The same arithmetic fused into one
loop over the words (hash, split into two 16-bit halves, compare with the threshold, pick the rescale or
0, multiply the activation) runs from registers and vectorises (AVX2 / AVX-512 clones chosen at load
time): well under 1 ns per decision.

The kernel (``hash_mask.cpp`` beside this file, registered as the torch operators
``dropwise_kernels::hash_factors`` / ``hash_product``) is compiled on first use with
``torch.utils.cpp_extension.load`` (gcc, about 10 s of CPU) and kept under
``$TORCH_EXTENSIONS_DIR/dropwise`` with a hash of the source, torch version and flags in its name, so it is
rebuilt only when one of them changes. It is used only for what it
reproduces bit for bit (tested against the torch path and the int64 reference formula): float32 CPU
tensors, contiguous rows, thresholds strictly between 0 and 65536, eager mode (never while exporting or
compiling). The build runs in a background thread started by the first mask: a process never stalls on
the compiler (a service's first MC request, a build lock left by a killed process), it uses the torch path
until the kernel is loaded. Everything else, and any machine where the build fails or ``DROPWISE_HASH_KERNEL=0`` is set,
takes the pure-torch path; `available` says which one runs. The kernel has no train / eval behaviour of its
own: it computes the MC masks the engine asks for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "disable_reason", "masked_factors", "masked_product"]

_log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("hash_mask.cpp")

_lock = threading.Lock()
_module: Any = None
_reason: str | None = None
_builder: threading.Thread | None = None


_FLAGS = ["-O3", "-std=c++17"]


def _cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH_EXTENSIONS_DIR/dropwise`` (default ``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(root) / "dropwise"


def _library_path() -> Path:
    """The built library for this source, torch version and flags (a content hash in its name)."""
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    digest.update(f"{torch.__version__}|{' '.join(_FLAGS)}".encode())
    return _cache_dir() / f"dropwise_hash_kernel_{digest.hexdigest()[:16]}.so"


def _build() -> None:
    """Load the cached library, or compile it (runs once per process, in a background thread).

    No shared lock: a process that finds no library compiles in a private temporary directory, then
    atomically renames the result into the cache (concurrent builders write identical files), so a build
    killed half-way leaves nothing that makes another process wait.
    """
    global _module, _reason
    try:
        target = _library_path()
        if not target.is_file():
            from torch.utils.cpp_extension import load

            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
                load(
                    name="dropwise_hash_kernel",
                    sources=[str(_SOURCE)],
                    extra_cflags=_FLAGS,
                    build_directory=tmp,
                    is_python_module=False,
                    verbose=False,
                )
                os.replace(Path(tmp) / "dropwise_hash_kernel.so", target)
        else:
            torch.ops.load_library(str(target))
        _module = torch.ops.dropwise_kernels
    except Exception as exc:  # no compiler, no headers, unsupported platform: torch path
        _reason = f"build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
        _log.warning("dropwise hash kernel unavailable (%s); using the torch path", _reason)


def _load(wait: bool) -> Any:
    """The loaded kernel operators, or None while building (``wait=False``) or when unavailable.

    The first call starts the build in a daemon thread, so a caller that does not wait (every mask) never
    stalls on the compiler: until the kernel is loaded, masks take the torch path, which gives the same bits.
    """
    global _builder, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _builder is None and _reason is None:
            if os.environ.get("DROPWISE_HASH_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = "disabled by DROPWISE_HASH_KERNEL"
                return None
            _builder = threading.Thread(target=_build, name="dropwise-hash-kernel-build", daemon=True)
            _builder.start()
    if wait and _builder is not None:
        _builder.join()
    return _module


def available() -> bool:
    """Whether the fused kernel runs on this machine (waits for the build, started on first use)."""
    return _load(wait=True) is not None


def disable_reason() -> str | None:
    """Why the kernel is not used (None when it is, or while it builds)."""
    return _reason


def _usable(*tensors: Tensor) -> bool:
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors) and _load(wait=False) is not None


def masked_factors(keys32: Tensor, codes32: Tensor, n_positions: int, thr: int, scale: float) -> Tensor | None:
    """Float32 factors ``[N, n_positions]`` (``scale`` kept, 0 dropped), or None when the kernel is unusable.

    ``keys32``: site keys ``[N]`` as int32 bit patterns; ``codes32``: position codes ``[(P + 1) // 2]`` as
    int32 bit patterns; ``0 < thr < 65536``.
    """
    if not _usable(keys32, codes32):
        return None
    return _module.hash_factors(keys32.contiguous(), codes32.contiguous(), int(n_positions), int(thr), float(scale))


def masked_product(x: Tensor, keys32: Tensor, codes32: Tensor, thr: int, scale: float) -> Tensor | None:
    """``x * factors`` for float32 ``x`` ``[N, P]`` in one pass, or None when the kernel is unusable."""
    if x.dtype != torch.float32 or x.dim() != 2 or not _usable(x, keys32, codes32):
        return None
    return _module.hash_product(x.contiguous(), keys32.contiguous(), codes32.contiguous(), int(thr), float(scale))
