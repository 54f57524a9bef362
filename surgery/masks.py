"""Counter-based dropout masks: a keyed integer hash instead of a per-element Bernoulli draw.

A counter-based generator (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3",
the idea behind Philox) produces the random bits of position ``i`` as ``hash(key, i)``: no state, any
element computable on its own, the same bits for the same key whatever else is computed beside it. Here the
hash is Chris Wellons' ``lowbias32`` 32-bit integer finaliser (xorshift-multiply, the murmur3 ``fmix32``
shape with constants 0x7feb352d / 0x846ca68b found by his hash prospector):

    h ^= h >> 16;  h *= 0x7feb352d;  h ^= h >> 15;  h *= 0x846ca68b;  h ^= h >> 16      (mod 2**32)

Key schedule (all values are unsigned 32-bit, carried in int64 tensors as ``[0, 2**32)``):

* request seed ``s`` (0 <= s < 2**63) -> ``seed_key = mix(mix(lo32(s) ^ C0) ^ hi32(s))``
* row ``r`` of the request (index WITHIN the request) -> ``row_key = mix(seed_key ^ mix(r ^ C1))``
* MC sample ``t`` -> ``sample_key = mix(row_key ^ mix(t ^ C2))``
* stochastic site ``j`` -> ``site_key = mix(sample_key ^ mix(j ^ C3))``
* mask word ``w`` (position block) -> ``word = mix(site_key ^ mix(w ^ C4))``

so a mask depends only on (seed, row within request, sample, site, position): a seeded request is
reproducible whatever else shares its batch. Each 32-bit word gives TWO mask decisions from its two
16-bit halves (low half = even position ``2w``, high half = odd position ``2w + 1``). A position is
dropped when its 16-bit value ``u < thr``, with ``thr = round(p * 65536)``: ``p`` is quantised to a
multiple of 2**-16 (error at most 7.6e-6; p = 0.5, 0.25, 0.1 -> 0.5, 0.25, 0.100006...). The effective
drop probability `quantised_p` is what the rescaling ``1 / (1 - p_eff)`` uses, so inverted dropout
stays exactly unbiased.

Three code paths give bit-identical masks (tested):

* on the CPU, the fused C++ kernel of `dropwise.surgery.hash_kernel` (hash, threshold, rescale and, for
  element-wise sites, the product with the activation in one vectorised loop; about 0.2 ns per decision
  at one thread against about 4.5 ns for the torch path), built on first use, with the torch path as its
  fallback;
* the torch path works on int32 tensors holding the 32 bits (wrapping multiply, shift then
  ``& 0xffff``) and reads the two halves by viewing the words as int16, so the per-element work is
  about a dozen int32 passes over half as many words as mask elements;
* the export path (``exportable=True``) uses int64 tensors with values kept in ``[0, 2**32)`` and only
  Mul / BitwiseAnd / BitwiseXor / right shifts and comparisons, which ``torch.onnx.export`` (dynamo)
  turns into ONNX ops that ONNX Runtime runs. Constants >= 2**31 are written as their negative
  two's-complement twin (``c - 2**32``) so that no int64 product ever overflows; ``& 0xffffffff``
  then yields the exact low 32 bits.

Beside this module: ``mask_onnx`` translates the hash's custom ops into ONNX nodes for the exporter, and
``keyed_sites`` holds the tail's site modules that draw from this hash.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import hash_kernel

__all__ = [
    "MASK_BITS",
    "keep_factor",
    "keep_mask",
    "keep_product",
    "mix32",
    "quantised_p",
    "row_keys",
    "sample_keys",
    "site_keys",
    "threshold",
]

MASK_BITS = 16
"""Bits per mask decision: each 32-bit hash word yields two decisions."""

_LEVELS = 1 << MASK_BITS
_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # < 2**31
_MUL2 = 0x846CA68B - (1 << 32)  # >= 2**31, written as its negative twin (same low 32 bits)
_C0, _C1, _C2, _C3, _C4, _C5 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646C
_LITTLE_ENDIAN = sys.byteorder == "little"


def threshold(p: float) -> int:
    """16-bit drop threshold for drop probability ``p``: a position drops when its value ``u < thr``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    return round(p * _LEVELS)


def quantised_p(p: float) -> float:
    """Drop probability actually realised by the 16-bit masks: ``round(p * 65536) / 65536``."""
    return threshold(p) / _LEVELS


def mix32(h: Tensor) -> Tensor:
    """``lowbias32`` hash of unsigned 32-bit values carried in an int64 tensor (values in ``[0, 2**32)``).

    Eager: int64 Mul, BitwiseAnd, BitwiseXor and right shifts of non-negative values. While
    ``torch.onnx.export`` traces, it is the custom op ``dropwise::mix32`` that `onnx_translation_table`
    turns into native uint32 ONNX ops (the exporter's int64 shift emulation costs five ops per shift).
    """
    if torch.compiler.is_exporting():
        return torch.ops.dropwise.mix32(h)
    return _mix32_int64(h)


def _mix32_int64(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _M32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _M32
    return h ^ (h >> 16)


def _mix32_int32_(h: Tensor) -> Tensor:
    """In-place ``lowbias32`` on an int32 tensor holding the 32 bits (wrapping multiply, logical shifts)."""
    t = torch.bitwise_right_shift(h, 16)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))
    h.mul_(_MUL1)
    torch.bitwise_right_shift(h, 15, out=t)
    h.bitwise_xor_(t.bitwise_and_(0x1FFFF))
    h.mul_(_MUL2)
    torch.bitwise_right_shift(h, 16, out=t)
    return h.bitwise_xor_(t.bitwise_and_(0xFFFF))


def _to_int32_bits(h: Tensor) -> Tensor:
    """Reinterpret int64 values in ``[0, 2**32)`` as int32 bit patterns."""
    return torch.where(h >= (1 << 31), h - (1 << 32), h).to(torch.int32)


def _mixed_constant(value: int, salt: int) -> int:
    """``mix(value ^ salt)`` for a python integer (site and counter codes), in plain python arithmetic."""
    h = (value ^ salt) & _M32
    h ^= h >> 16
    h = (h * _MUL1) & _M32
    h ^= h >> 15
    h = (h * _MUL2) & _M32
    return h ^ (h >> 16)


def seed_keys(seeds: Tensor) -> Tensor:
    """32-bit keys of request seeds (int64, ``0 <= seed < 2**63``), mixing both 32-bit halves."""
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    return mix32(mix32(lo ^ _C0) ^ hi)


def row_keys(seeds: Tensor, rows: Tensor) -> Tensor:
    """Key of each batch row from its request seed and its row index within that request (both ``[B]``)."""
    return mix32(seed_keys(seeds) ^ mix32((rows & _M32) ^ _C1))


def sample_keys(keys: Tensor, samples: int | Tensor, start: int = 0) -> Tensor:
    """Keys ``[S * B]`` of MC samples ``start .. start + S - 1`` of rows with keys ``[B]``, sample-major.

    Row ``n = s * B + b`` of the result belongs to sample ``start + s`` of row ``b``: the layout of a batch
    repeated S times along dimension 0. ``samples`` may be a 0-d int64 tensor (run-time T in export).
    """
    if isinstance(samples, Tensor):
        t = torch.arange(samples.item(), dtype=torch.int64, device=keys.device) if samples.dim() == 0 else samples
    else:
        t = torch.arange(start, start + samples, dtype=torch.int64, device=keys.device)
    codes = mix32((t & _M32) ^ _C2)
    return mix32(keys.unsqueeze(0) ^ codes.unsqueeze(1)).reshape(-1)


def site_keys(keys: Tensor, site: int) -> Tensor:
    """Keys of stochastic site number ``site`` for per-sample-row keys ``[N]``."""
    return mix32(keys ^ _mixed_constant(site, _C3))


_POSITION_CODES: dict[tuple[int, str], Tensor] = {}


def _position_codes(n_words: int, device: torch.device, int32: bool) -> Tensor:
    """``mix(w ^ C4)`` for words ``w < n_words`` (cached), int64 or as int32 bit patterns."""
    key = (n_words, f"{device}:{int32}")
    codes = _POSITION_CODES.get(key)
    if codes is None:
        codes = mix32(torch.arange(n_words, dtype=torch.int64, device=device) ^ _C4)
        if int32:
            codes = _to_int32_bits(codes)
        _POSITION_CODES[key] = codes
    return codes


def _uniform16_exportable(site_k: Tensor, n_positions: int) -> Tensor:
    """16-bit values ``[N, n_positions]`` (int64 in ``[0, 65536)``) through export-friendly int64 ops."""
    n_words = (n_positions + 1) // 2
    codes = mix32(torch.arange(n_words, dtype=torch.int64, device=site_k.device) ^ _C4)
    words = mix32(site_k.unsqueeze(1) ^ codes.unsqueeze(0))
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(-1, 2 * n_words)
    return halves[:, :n_positions]


def keep_mask(
    keys: Tensor,
    site: int,
    shape: Sequence[int],
    p: float,
    *,
    exportable: bool = False,
    site_bits: Tensor | None = None,
) -> Tensor:
    """Boolean keep-mask ``[N, *shape]`` for site ``site`` of N sample-rows with keys ``[N]``.

    Position ``i`` (row-major over ``shape``) of row ``n`` is kept when the ``i``-th 16-bit hash value of
    ``site_key(keys[n], site)`` is ``>= threshold(p)``, i.e. with probability ``1 - quantised_p(p)``,
    independently across rows, samples, sites and positions (up to the hash's quality, tested in
    ``tests/test_engine.py``). ``exportable=True`` takes the int64 path that
    exports to ONNX; both paths return identical masks. Under ``torch.compile`` the int64 path is traced
    (inductor fuses hash, threshold and the consumer's product into one kernel), reading the precomputed
    ``site_bits`` (site keys as int32 bit patterns) when given.
    """
    n_positions = 1
    for size in shape:
        n_positions *= int(size)
    thr = threshold(p)
    if thr == 0 or thr == _LEVELS:  # p_eff = 0 keeps everything, p_eff = 1 drops everything: no hash needed
        return torch.full((keys.shape[0], *shape), thr == 0, dtype=torch.bool, device=keys.device)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        # torch.compile: plain int64 arithmetic on the site keys, which inductor fuses into the consumer
        # (the int16 view of the eager path would force the words into memory first)
        site_k = site_keys(keys, site) if site_bits is None else site_bits.to(torch.int64) & _M32
        return (_uniform16_exportable(site_k, n_positions) >= thr).reshape(-1, *shape)
    site_k = site_keys(keys, site)
    if torch.compiler.is_exporting():
        return torch.ops.dropwise.hash_keep(site_k, n_positions, thr).reshape(-1, *shape)
    return _hash_keep(site_k, n_positions, thr, exportable).reshape(-1, *shape)


def keep_factor(
    keys: Tensor,
    site: int,
    shape: Sequence[int],
    p: float,
    scale: float,
    dtype: torch.dtype = torch.float32,
    *,
    exportable: bool = False,
    site_bits: Tensor | None = None,
) -> Tensor:
    """``scale * keep_mask(...)`` as a ``dtype`` tensor ``[N, *shape]`` (values 0 or ``scale``).

    Same decisions as `keep_mask`. The fast float32 path builds the factors with integer ops (the sign of
    ``u - thr`` selects the bit pattern of ``scale`` or of 0.0) instead of a comparison followed by a
    bool -> float conversion, which costs several times more on the CPU. ``site_bits``: the site keys
    ``site_keys(keys, site)`` as int32 bit patterns when already known (the fast path then skips hashing
    them).
    """
    n_positions = 1
    for size in shape:
        n_positions *= int(size)
    thr = threshold(p)
    # Under torch.compile the bool form is used: inductor fuses it, and mis-compiles int32 -> float32 views.
    special = torch.compiler.is_exporting() or torch.compiler.is_compiling()
    fast = not (exportable or special or thr in (0, _LEVELS))
    if not fast or dtype != torch.float32 or not _LITTLE_ENDIAN:
        return keep_mask(keys, site, shape, p, exportable=exportable, site_bits=site_bits).to(dtype) * scale
    site_k = _to_int32_bits(site_keys(keys, site)) if site_bits is None else site_bits
    n_words = (n_positions + 1) // 2
    codes = _position_codes(n_words, site_k.device, True)
    factors = hash_kernel.masked_factors(site_k, codes, n_positions, thr, scale)
    if factors is not None:
        return factors.reshape(-1, *shape)
    words = site_k.unsqueeze(1) ^ codes.unsqueeze(0)
    _mix32_int32_(words)
    u = words.view(torch.int16).to(torch.int32)  # [N, 2W] signed halves: u16 - 65536 * (u16 >= 32768)
    u.bitwise_and_(0xFFFF).sub_(thr)  # u16 - thr: negative exactly when the position drops
    u.bitwise_right_shift_(31)  # -1 (drop) or 0 (keep)
    bits = struct.unpack("<i", struct.pack("<f", scale))[0]  # float32 bit pattern, no tensor op
    u.bitwise_not_().bitwise_and_(bits)  # keep -> bit pattern of scale, drop -> 0 (= 0.0)
    factors = u.view(torch.float32)
    if 2 * n_words != n_positions:
        factors = factors[:, :n_positions]
    return factors.reshape(-1, *shape)


def keep_product(
    x: Tensor,
    keys: Tensor,
    site: int,
    p: float,
    scale: float,
    *,
    exportable: bool = False,
    site_bits: Tensor | None = None,
) -> Tensor:
    """``x * keep_factor(keys, site, x.shape[1:], p, scale, x.dtype)``: one decision per element of a row.

    On the CPU with the fused kernel (`dropwise.surgery.hash_kernel`) and a contiguous float32 ``x`` the
    masks are generated and applied in one pass; otherwise the factors are built and multiplied. Both give
    the same bits. ``site_bits``: as in `keep_factor`.
    """
    thr = threshold(p)
    eager = not (exportable or torch.compiler.is_compiling())  # compiled: inductor fuses the factors' product
    if eager and 0 < thr < _LEVELS and x.dtype == torch.float32 and x.dim() >= 2 and x.is_contiguous():
        n_positions = x[0].numel()
        if site_bits is None:
            site_bits = _to_int32_bits(site_keys(keys, site))
        codes = _position_codes((n_positions + 1) // 2, site_bits.device, True)
        out = hash_kernel.masked_product(x.reshape(x.shape[0], n_positions), site_bits, codes, thr, scale)
        if out is not None:
            return out.reshape(x.shape)
    factors = keep_factor(keys, site, tuple(x.shape[1:]), p, scale, x.dtype, exportable=exportable, site_bits=site_bits)
    return x * factors


def _hash_keep(site_k: Tensor, n_positions: int, thr: int, exportable: bool) -> Tensor:
    """Keep decisions ``[N, n_positions]`` (``u >= thr``) from site keys ``[N]``; see `keep_mask`."""
    if exportable or not _LITTLE_ENDIAN:
        return _uniform16_exportable(site_k, n_positions) >= thr
    n_words = (n_positions + 1) // 2
    words = _to_int32_bits(site_k).unsqueeze(1) ^ _position_codes(n_words, site_k.device, True).unsqueeze(0)
    _mix32_int32_(words)
    halves = words.view(torch.int16)  # [N, 2 * n_words]: low half first on little-endian machines
    halves.bitwise_xor_(-(1 << 15))  # signed value = u - 32768, so a signed compare orders like u
    keep = halves >= thr - (1 << 15)
    if 2 * n_words != n_positions:
        keep = keep[:, :n_positions]
    return keep


# ----------------------------------------------------------------- export: custom ops -> uint32 ONNX ops


@torch.library.custom_op("dropwise::mix32", mutates_args=())
def _mix32_op(h: Tensor) -> Tensor:
    """Custom-op form of `mix32` (what the exporter sees)."""
    return _mix32_int64(h)


@_mix32_op.register_fake
def _(h: Tensor) -> Tensor:
    return torch.empty_like(h)


@torch.library.custom_op("dropwise::hash_keep", mutates_args=())
def _hash_keep_op(site_k: Tensor, n_positions: int, thr: int) -> Tensor:
    """Custom-op form of the per-position keep decisions (what the exporter sees)."""
    return _hash_keep(site_k, n_positions, thr, exportable=False)


@_hash_keep_op.register_fake
def _(site_k: Tensor, n_positions: int, thr: int) -> Tensor:
    return site_k.new_empty((site_k.shape[0], n_positions), dtype=torch.bool)
