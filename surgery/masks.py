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
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.overrides import TorchFunctionMode

from . import hash_kernel
from .functional_sites import FUNCTIONAL_SPECS, FunctionalSpec

__all__ = [
    "MASK_BITS",
    "SITE_FORMS",
    "HashMaskSite",
    "KeyedRandom",
    "MaskContext",
    "TrainModeSite",
    "keep_factor",
    "keep_mask",
    "keep_product",
    "mix32",
    "onnx_translation_table",
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


def keep_mask(keys: Tensor, site: int, shape: Sequence[int], p: float, *, exportable: bool = False) -> Tensor:
    """Boolean keep-mask ``[N, *shape]`` for site ``site`` of N sample-rows with keys ``[N]``.

    Position ``i`` (row-major over ``shape``) of row ``n`` is kept when the ``i``-th 16-bit hash value of
    ``site_key(keys[n], site)`` is ``>= threshold(p)``, i.e. with probability ``1 - quantised_p(p)``,
    independently across rows, samples, sites and positions (up to the hash's quality, tested in
    ``tests/test_engine.py``). ``exportable=True`` takes the int64 path that
    exports to ONNX; both paths return identical masks.
    """
    n_positions = 1
    for size in shape:
        n_positions *= int(size)
    thr = threshold(p)
    if thr == 0 or thr == _LEVELS:  # p_eff = 0 keeps everything, p_eff = 1 drops everything: no hash needed
        return torch.full((keys.shape[0], *shape), thr == 0, dtype=torch.bool, device=keys.device)
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
        return keep_mask(keys, site, shape, p, exportable=exportable).to(dtype) * scale
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
    if not exportable and 0 < thr < _LEVELS and x.dtype == torch.float32 and x.dim() >= 2 and x.is_contiguous():
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


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the hash as native uint32 ONNX ops.

    ONNX Runtime's CPU kernels take uint32 for Mul (wrapping), BitShift, BitwiseXor/And and comparisons, so
    the hash runs as six uint32 ops per word, bit-identical to the torch paths (tested).
    """
    from onnx import TensorProto, helper
    from onnxscript import opset20

    op: Any = opset20  # onnxscript's per-op type stubs reject these (valid) uint32 / int64 mixes

    def const_u32(values: Sequence[int] | int, name: str) -> Any:
        if isinstance(values, int):
            return op.Constant(value=helper.make_tensor(name, TensorProto.UINT32, [], [values]))
        return op.Constant(value=helper.make_tensor(name, TensorProto.UINT32, [len(values)], list(values)))

    def mix_u32(x: Any) -> Any:
        c16, c15 = const_u32(16, "s16"), const_u32(15, "s15")
        x = op.BitwiseXor(x, op.BitShift(x, c16, direction="RIGHT"))
        x = op.Mul(x, const_u32(_MUL1, "m1"))
        x = op.BitwiseXor(x, op.BitShift(x, c15, direction="RIGHT"))
        x = op.Mul(x, const_u32(_MUL2 & _M32, "m2"))
        return op.BitwiseXor(x, op.BitShift(x, c16, direction="RIGHT"))

    def mix32_onnx(h: Any) -> Any:
        return op.Cast(mix_u32(op.Cast(h, to=TensorProto.UINT32)), to=TensorProto.INT64)

    def hash_keep_onnx(site_k: Any, n_positions: int, thr: int) -> Any:
        n_words = (n_positions + 1) // 2
        codes = [int(c) for c in _position_codes(n_words, torch.device("cpu"), False).tolist()]
        keys = op.Unsqueeze(op.Cast(site_k, to=TensorProto.UINT32), op.Constant(value_ints=[1]))
        words = mix_u32(op.BitwiseXor(keys, const_u32(codes, "codes")))
        lo = op.Unsqueeze(op.BitwiseAnd(words, const_u32(0xFFFF, "lo")), op.Constant(value_ints=[2]))
        hi = op.Unsqueeze(op.BitShift(words, const_u32(16, "s16h"), direction="RIGHT"), op.Constant(value_ints=[2]))
        halves = op.Reshape(op.Concat(lo, hi, axis=2), op.Constant(value_ints=[-1, 2 * n_words]))
        if 2 * n_words != n_positions:
            halves = op.Slice(
                halves,
                op.Constant(value_ints=[0]),
                op.Constant(value_ints=[n_positions]),
                op.Constant(value_ints=[1]),
            )
        return op.GreaterOrEqual(halves, const_u32(thr, "thr"))

    return {
        torch.ops.dropwise.mix32.default: mix32_onnx,
        torch.ops.dropwise.hash_keep.default: hash_keep_onnx,
    }


class MaskContext:
    """Per-pass state shared by the hash-mask site modules of one MC tail.

    ``keys`` is the int64 tensor ``[N]`` of sample-row keys (`sample_keys`) of the rows the tail is about
    to process; the engine sets it before each tail pass (a plain attribute, so tracing for export sees
    it as a graph value). ``site_bits`` optionally maps a site index to its precomputed site keys ``[N]``
    (``site_keys(keys, site)`` as int32 bit patterns; ``dropwise.surgery.mc_layout``) so that a pass does
    not rehash them. ``exportable`` selects the int64 export path of `keep_mask`.
    """

    def __init__(self, exportable: bool = False) -> None:
        self.keys: Tensor | None = None
        self.site_bits: dict[int, Tensor] | None = None
        self.exportable = exportable

    def require_keys(self) -> Tensor:
        """The current keys; raises when a site runs outside an engine pass."""
        if self.keys is None:
            raise RuntimeError("hash-mask site called without keys: run it through MCEngine")
        return self.keys


# torch's SELU-preserving alpha dropout constant (-lambda * alpha of SELU), see Klambauer et al. 2017.
_ALPHA = 1.7580993408473766

SITE_FORMS: tuple[str, ...] = (
    "element",
    "classic",
    "channel",
    "embedding",
    "path",
    "path_classic",
    "alpha",
    "feature_alpha",
)
"""Forms a `HashMaskSite` can take (see its docstring)."""


class HashMaskSite(torch.nn.Module):
    """A dropout-family site made stochastic with counter-based masks (MC dropout, Gal & Ghahramani 2016).

    Always stochastic (it replaces a site inside an MC tail, whatever the ``training`` flag). With
    ``q = 1 - quantised_p(p)``, input ``x: [N, ...]`` (N = sample-rows, keys from the shared context):

    * ``element``: inverted dropout, ``x * m / q`` with one decision per element (``nn.Dropout``);
    * ``classic``: ``x * m`` without rescaling (Srivastava 2014, `ClassicDropout`);
    * ``channel``: ``x * m / q`` with one decision per (row, channel = dim 1), broadcast over the rest
      (``nn.Dropout1d/2d/3d``, matching torch's treatment of every input rank >= 3);
    * ``embedding``: ``[N, L, E]`` with one decision per (row, embedding dim) shared over L, ``/ q``;
    * ``path`` / ``path_classic``: one gate per row on a residual branch, ``/ q`` (timm) or not (Huang 2016;
      under MC each sample-row gets its own gate, the marginal of Huang's per-mini-batch gate);
    * ``alpha`` / ``feature_alpha``: torch's alpha dropout affine form ``a * (x*m + alpha' * (1 - m)) + b``
      (Klambauer et al. 2017) per element or per channel.
    """

    def __init__(self, context: MaskContext, site: int, p: float, form: str) -> None:
        super().__init__()
        if form not in SITE_FORMS:
            raise ValueError(f"unknown site form {form!r}; one of {SITE_FORMS}")
        self.context = context
        self.site = int(site)
        self.p = float(p)
        self.form = form
        self.q = 1.0 - quantised_p(self.p)
        self._pass_keys: Tensor | None = None
        self._pass_calls = 0

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.form in ("element", "classic", "alpha"):
            return tuple(x.shape[1:])
        if self.form in ("channel", "feature_alpha"):
            return (x.shape[1],) + (1,) * (x.dim() - 2)
        if self.form == "embedding":
            if x.dim() != 3:
                raise ValueError(f"embedding dropout expects [N, L, E], got {tuple(x.shape)}")
            return (1, x.shape[2])
        return (1,) * (x.dim() - 1)  # path gates

    def _site_code(self, keys: Tensor) -> int:
        """The site number keying this call: ``site`` for a pass's first call, a distinct code for each later
        call of the same module in the same pass (ViT calls one ``nn.Dropout`` twice per layer: without it
        both calls would draw the same mask)."""
        if keys is not self._pass_keys:
            self._pass_keys, self._pass_calls = keys, 0
        call = self._pass_calls
        self._pass_calls += 1
        return self.site if call == 0 else self.site + (call << 24)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the site's masked form to ``x`` (see class docstring)."""
        keys = self.context.require_keys()
        site = self._site_code(keys)
        table = None if self.context.exportable else self.context.site_bits
        bits = None if table is None else table.get(site)
        # One product with float factors (0 or the rescale): cheaper on the CPU than torch.where or a
        # product with a boolean mask.
        shape = self._mask_shape(x)
        exportable = self.context.exportable
        if self.form in ("alpha", "feature_alpha"):
            if self.q == 0.0:
                return torch.zeros_like(x)
            a = 1.0 / ((_ALPHA * _ALPHA * (1.0 - self.q) + 1.0) * self.q) ** 0.5
            b = _ALPHA * a * (1.0 - self.q)
            # a*(x*m + alpha'*(1-m)) + b with alpha' = -alpha  ==  m*(a*x + alpha*a) + (b - alpha*a)
            factors = keep_factor(keys, site, shape, self.p, 1.0, x.dtype, exportable=exportable, site_bits=bits)
            return (x * a + _ALPHA * a).mul_(factors).add_(b - _ALPHA * a)
        if self.q == 0.0:
            return x * 0.0
        scale = 1.0 if self.form in ("classic", "path_classic") else 1.0 / self.q
        if self.form in ("element", "classic"):
            return keep_product(x, keys, site, self.p, scale, exportable=exportable, site_bits=bits)
        return x * keep_factor(keys, site, shape, self.p, scale, x.dtype, exportable=exportable, site_bits=bits)

    def extra_repr(self) -> str:
        return f"site={self.site}, p={self.p}, form={self.form}"


def _uniform24(base: Tensor, n_positions: int) -> Tensor:
    """Uniforms ``[N, n_positions]`` on a 2**-24 grid: top 24 bits of ``mix(base ^ mix(w ^ C4))``.

    Eager: the in-place int32 hash of `keep_factor`'s fast path (bit-identical to the int64 one, a few
    times faster: `KeyedRandom` draws dominate a DropBlock tail); exporting or compiling: int64 `mix32`.
    """
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        positions = mix32(torch.arange(n_positions, dtype=torch.int64, device=base.device) ^ _C4)
        words = mix32(base.unsqueeze(1) ^ positions.unsqueeze(0))
        return (words >> 8).to(torch.float32) * (1.0 / (1 << 24))
    codes = _position_codes(n_positions, base.device, True)
    words = _to_int32_bits(base).unsqueeze(1) ^ codes.unsqueeze(0)
    _mix32_int32_(words)
    words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # logical shift of the 32 bits
    return words.to(torch.float32).mul_(1.0 / (1 << 24))


class KeyedRandom(TorchFunctionMode):
    """Routes torch's random draws inside one site to the counter-based hash (for `TrainModeSite`).

    Intercepts ``Tensor.bernoulli_`` / ``torch.bernoulli`` (keep with probability p), ``torch.rand`` /
    ``torch.rand_like`` (uniform on a 2**-24 grid) and ``torch.randint``. Draw number ``c`` of the site's
    call gets key ``mix(site_key ^ mix(c ^ C5))``; a draw with a dimension equal to the number N of
    sample-rows (the first such) is keyed PER ROW along it (row n uses sample-row n's key: per-example layers
    such as DropConnect, DropBlock or FractalJoin's drop and survivor draws stay reproducible per row
    whatever shares the batch); any other draw uses one key from all N keys (reproducible for an identical
    batch) and is counted in ``shared_draws``. Each element gets its own 32-bit hash word; the uniform is its
    top 24 bits. ``generator`` arguments are ignored. Caveat: a layer whose per-example draws have some OTHER
    dimension of size N (N = T * B rows) would be keyed along that one.

    Functional dropout (``dropwise.surgery.functional_sites.FUNCTIONAL_SPECS``) is intercepted too: an active
    ``F.dropout*`` / ``torch.dropout`` / alpha dropout call is computed with keyed masks, an active
    ``scaled_dot_product_attention`` with ``dropout_p > 0`` by its reference math with a keyed mask on the
    attention weights, and the project's own functional forms run their body with their draws keyed. With
    ``functions`` given, only calls with those labels (``"dropout#0"``: function and ordinal among that
    function's active calls in this forward) are stochastic; the other active calls run in eval form.
    """

    def __init__(self, keys: Tensor, site: int, functions: frozenset[str] | None = None) -> None:
        super().__init__()
        self.keys = keys
        self.site_k = site_keys(keys, site)
        self.calls = 0
        self.shared_draws = 0
        self.functions = functions
        self._ordinals: dict[str, int] = {}

    def _uniform(self, shape: Sequence[int], device: torch.device) -> Tensor:
        code = _mixed_constant(self.calls, _C5)
        self.calls += 1
        shape = tuple(shape)  # sizes may be symbolic while exporting: no int() on them
        n_rows = self.keys.shape[0]
        row_dim = next((d for d, size in enumerate(shape) if guard_or_false(size == n_rows)), None)
        if row_dim is not None:
            base = mix32(self.site_k ^ code)
            inner = shape[:row_dim] + shape[row_dim + 1 :]
        else:
            self.shared_draws += 1
            base = mix32((self.site_k.sum(dim=0, keepdim=True) & _M32) ^ code)
            inner = shape
        n_positions = 1
        for size in inner:
            n_positions *= size
        u = _uniform24(base, n_positions)
        if row_dim is None:
            return u.reshape(shape).to(device)
        return u.reshape(n_rows, *inner).movedim(0, row_dim).to(device)

    def _keep(self, x: Tensor, channel: bool, p: float) -> Tensor:
        """Keyed {0, 1} keep mask for ``x`` (per element, or per (row, channel) when ``channel``)."""
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2) if channel and x.dim() > 2 else tuple(x.shape)
        return (self._uniform(shape, x.device) >= p).to(x.dtype)

    def _dropout(self, spec: FunctionalSpec, args: tuple, kwargs: dict) -> Tensor:
        x, p = args[0] if args else kwargs["input"], spec.p(args, kwargs)
        channel = "feature" in spec.name or spec.name[-2:] in ("1d", "2d", "3d")
        if "alpha" in spec.name:
            q = 1.0 - p
            if q == 0.0:
                return torch.zeros_like(x)
            a = 1.0 / ((_ALPHA * _ALPHA * p + 1.0) * q) ** 0.5
            b = _ALPHA * a * p
            return (x * a + _ALPHA * a) * self._keep(x, channel, p) + (b - _ALPHA * a)
        if p >= 1.0:
            return x * 0.0
        return x * self._keep(x, channel, p) * (1.0 / (1.0 - p))

    def _attention(self, args: tuple, kwargs: dict) -> Tensor:
        """``scaled_dot_product_attention`` by its reference math, the dropout mask keyed per row."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args, strict=False)) | kwargs
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, p = bound.get("attn_mask"), float(bound.get("dropout_p", 0.0))
        scale = bound.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if bound.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        scores = (q @ k.transpose(-2, -1)) * scale
        if bound.get("is_causal", False):
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p >= 1.0:
            weights = weights * 0.0
        elif p > 0.0:
            weights = weights * self._keep(weights, False, p) * (1.0 / (1.0 - p))
        return weights @ v

    def _functional(self, func: Any, spec: FunctionalSpec, args: tuple, kwargs: dict) -> Any:
        if not spec.active(args, kwargs):
            return func(*args, **kwargs)
        ordinal = self._ordinals.get(spec.name, 0)
        self._ordinals[spec.name] = ordinal + 1
        if self.functions is not None and f"{spec.name}#{ordinal}" not in self.functions:
            off_args, off_kwargs = spec.switched_off(args, kwargs)
            return func(*off_args, **off_kwargs)
        if spec.project:
            with self:  # the form's own body, its draws keyed (the undecorated body does not re-dispatch)
                return func.__wrapped__(*args, **kwargs)
        if spec.kind == "attention_dropout":
            return self._attention(args, kwargs)
        return self._dropout(spec, args, kwargs)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        spec = FUNCTIONAL_SPECS.get(func)
        if spec is not None:
            return self._functional(func, spec, args, kwargs)
        if func is Tensor.bernoulli_:
            target = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            u = self._uniform(target.shape, target.device)
            return target.copy_(u < p)  # in place, as bernoulli_ is: callers may ignore the return value
        if func is torch.bernoulli:
            probs = args[0]
            u = self._uniform(probs.shape, probs.device)
            return (u < probs).to(probs.dtype)
        if func is torch.rand_like:
            like = args[0]
            return self._uniform(like.shape, like.device).to(kwargs.get("dtype") or like.dtype)
        if func is torch.rand:
            size = args[0] if len(args) == 1 and isinstance(args[0], Sequence) else args
            u = self._uniform(size, kwargs.get("device") or self.keys.device)
            return u.to(kwargs.get("dtype") or torch.get_default_dtype())
        if func is torch.randint:
            low, high = (0, args[0]) if len(args) == 2 else (args[0], args[1])
            size = args[-1]
            u = self._uniform(size, kwargs.get("device") or self.keys.device)
            return (u * (high - low)).floor().to(torch.int64) + low
        return func(*args, **kwargs)


def _row_local_layers() -> tuple[type, ...]:
    """Layers whose train-mode forward treats rows independently apart from its random draws."""
    try:
        from dropwise.models.layers import DropBlock2d, DropConnectConv2d, DropConnectLinear, FractalJoin
    except ImportError:  # surgery used without the models package: no layer is known to be row-local
        return ()
    return (DropBlock2d, DropConnectConv2d, DropConnectLinear, FractalJoin)


class TrainModeSite(torch.nn.Module):
    """Wraps a site with no hash-mask form (DropBlock, DropConnect, FractalJoin, a functional site's gate).

    Runs the wrapped module's own forward with ITS OWN ``training`` flag set (children keep theirs, so a
    BatchNorm inside stays in eval) and its random draws routed to the counter-based hash by
    `KeyedRandom`: the layer's own sampling logic (DropBlock's valid-region seeds, DropConnect's
    per-example weight masks, FractalJoin's survivor rule) with hash-based draws. A ``dropwise.models.layers``
    ``DropBlock2d`` runs with ``normalize="sample"`` (its rescale counted per sample instead of over the
    whole batch; both preserve the expectation), so its rows do not depend on each other.

    A functional site's gating module (``F.dropout(h, p, self.training)``, attention dropout) is wrapped
    whole: its own flag is set for the pass (children keep theirs, so nested module sites are replaced
    separately) and `KeyedRandom` computes its dropout calls with keyed masks (``functions``: the labels of
    the chosen calls; None = all).

    ``rows_independent``: whether a seeded row's output can depend only on that row (its seed, row index
    and sample), never on the rest of the batch. True when every draw seen so far was keyed per row AND the
    wrapped module is a ``dropwise.models.layers`` DropBlock2d, DropConnect layer or FractalJoin, or the
    gating module of functional sites (its train-mode forward is taken to treat rows apart, as attention
    and MLP blocks do; the engine's probe pass and the tests check it on transformers models). A
    ``per_example=False`` DropConnect mask, or a DropConnect over a ``[B, L, F]`` input, draws one mask for
    the whole batch. Other modules (timm / torchvision DropBlock, which rescale over the whole batch,
    user-registered kinds) are False. Meaningful once a pass has run (the engine runs one).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        context: MaskContext,
        site: int,
        *,
        functional: bool = False,
        functions: frozenset[str] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.context = context
        self.site = int(site)
        self.functional = bool(functional)
        self.functions = functions
        layers = _row_local_layers()
        self._row_local = self.functional or isinstance(module, layers)
        self._per_sample_norm = bool(layers) and isinstance(module, layers[0])
        self.shared_draws = 0
        self._pass_keys: Tensor | None = None
        self._pass_calls = 0

    @property
    def rows_independent(self) -> bool:
        """See the class docstring."""
        return self._row_local and self.shared_draws == 0

    def forward(self, *args: object, **kwargs: object) -> object:
        """Run the wrapped module stochastically with keyed draws."""
        module: Any = self.module
        module.training = True
        if self._per_sample_norm:
            saved = getattr(module, "normalize", "batch")
            module.normalize = "sample"
        try:
            keys = self.context.require_keys()
            if keys is not self._pass_keys:  # a later call in the same pass draws under a distinct site code
                self._pass_keys, self._pass_calls = keys, 0
            site = self.site if self._pass_calls == 0 else self.site + (self._pass_calls << 24)
            self._pass_calls += 1
            random = KeyedRandom(keys, site, self.functions)
            with random:
                out = self.module(*args, **kwargs)
            self.shared_draws += random.shared_draws
            return out
        finally:
            module.training = False
            if self._per_sample_norm:
                module.normalize = saved
