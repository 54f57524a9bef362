"""The counter-based dropout hash written directly as ONNX nodes (for graphs that never were torch modules).

`dropwise.surgery.masks` defines the masks of every MC path: the ``lowbias32`` integer hash (a counter-based
generator in the sense of Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") keyed by
(seed, row within the request, MC sample, site, position). The torch engine computes it with torch ops and
the torch-exported MC graph gets it from ``mask_onnx.onnx_translation_table``; this module emits the same
computation as plain ONNX nodes so that `dropwise.surgery.onnx_surgery` can put it into a graph that came
from an ONNX file. Same constants, same key schedule, same 16-bit halves: a seeded run of such a graph
draws exactly the masks ``masks.keep_mask`` draws (tested bit for bit).

Values are unsigned 32-bit (``uint32`` tensors): Mul wraps modulo 2**32 as the hash needs, right shifts
are ``BitShift`` and the mixing is ``BitwiseXor``. ONNX Runtime's CPU kernels take all of them for uint32;
its CUDA provider has no kernel for BitShift and the Bitwise ops, and `dropwise.surgery.onnx_cuda` rewrites
them into integer arithmetic it has (bit-identical) before a CUDA session is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .masks import _C0, _C1, _C2, _C3, _C4, _M32, _MUL1, _MUL2, _mixed_constant, threshold

__all__ = ["GraphBuilder", "HashOps"]


class GraphBuilder:
    """Collects new nodes and initializers under unique names with a common prefix."""

    def __init__(self, prefix: str, taken: set[str] | None = None) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken or ())
        self._count = 0

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used before (in this builder or in ``taken``)."""
        while True:
            self._count += 1
            name = f"{self.prefix}/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, value: np.ndarray | int | float, hint: str, dtype: type | None = None) -> str:
        """An initializer holding ``value`` (numpy array or scalar of ``dtype``)."""
        array = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def u32(self, value: int | Sequence[int], hint: str) -> str:
        """A uint32 constant (scalar or 1-d)."""
        return self.const(np.asarray(value, dtype=np.uint32), hint)

    def i64(self, value: int | Sequence[int], hint: str) -> str:
        """An int64 constant (scalar or 1-d)."""
        return self.const(np.asarray(value, dtype=np.int64), hint)

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        """Append one node with a single output; returns the output's name."""
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        """``Cast(x, to)``."""
        return self.op("Cast", [x], "cast", to=to)


class HashOps:
    """Emits the ``lowbias32`` hash and the key schedule of `dropwise.surgery.masks` into a `GraphBuilder`."""

    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder
        self._s16 = builder.u32(16, "s16")
        self._s15 = builder.u32(15, "s15")
        self._m1 = builder.u32(_MUL1, "m1")
        self._m2 = builder.u32(_MUL2 & _M32, "m2")

    def _xorshift(self, x: str, shift: str) -> str:
        return self.b.op("BitwiseXor", [x, self.b.op("BitShift", [x, shift], "shr", direction="RIGHT")], "xs")

    def mix(self, x: str) -> str:
        """``lowbias32`` of a uint32 tensor: xorshift 16, * 0x7feb352d, xorshift 15, * 0x846ca68b, xorshift 16."""
        x = self._xorshift(x, self._s16)
        x = self.b.op("Mul", [x, self._m1], "mul")
        x = self._xorshift(x, self._s15)
        x = self.b.op("Mul", [x, self._m2], "mul")
        return self._xorshift(x, self._s16)

    def xor_const(self, x: str, value: int | Sequence[int], hint: str) -> str:
        """``x ^ value`` with a uint32 constant."""
        return self.b.op("BitwiseXor", [x, self.b.u32(value, hint)], "xor")

    def row_keys(self, seed: str, batch: str) -> str:
        """Keys ``[B]`` (uint32) of rows ``0..B-1`` of one request with int64 scalar ``seed >= 0``.

        ``batch`` is an int64 scalar tensor (B). Mirrors ``masks.row_keys(seed.expand(B), arange(B))``.
        """
        b = self.b
        two32 = b.i64(1 << 32, "two32")
        lo = b.cast(b.op("Mod", [seed, two32], "lo"), TensorProto.UINT32)
        hi = b.cast(b.op("Div", [seed, two32], "hi"), TensorProto.UINT32)
        seed_key = self.mix(b.op("BitwiseXor", [self.mix(self.xor_const(lo, _C0, "c0")), hi], "xor"))
        rows = b.cast(b.op("Range", [b.i64(0, "zero"), batch, b.i64(1, "one")], "rows"), TensorProto.UINT32)
        row_codes = self.mix(self.xor_const(rows, _C1, "c1"))
        return self.mix(b.op("BitwiseXor", [seed_key, row_codes], "xor"))

    def sample_keys(self, keys: str, samples: str) -> str:
        """Keys ``[T * B]`` of samples ``0..T-1`` of rows with keys ``[B]``, sample-major (``n = t*B + b``)."""
        b = self.b
        t = b.cast(b.op("Range", [b.i64(0, "zero"), samples, b.i64(1, "one")], "t"), TensorProto.UINT32)
        codes = self.mix(self.xor_const(t, _C2, "c2"))
        grid = b.op(
            "BitwiseXor",
            [b.op("Unsqueeze", [keys, b.i64([0], "ax0")]), b.op("Unsqueeze", [codes, b.i64([1], "ax1")])],
            "xor",
        )
        return b.op("Reshape", [self.mix(grid), b.i64([-1], "flat")], "sample_keys")

    def site_keys(self, keys: str, site: int) -> str:
        """Keys of stochastic site number ``site`` (its index among all sites, in execution order)."""
        return self.mix(self.xor_const(keys, _mixed_constant(site, _C3), f"site{site}"))

    def keep_factor(self, x: str, keys: str, site: int, p: float, dtype: int) -> str:
        """``x * m / (1 - p_eff)`` with the element-wise keep-mask ``m`` of `masks.keep_mask` (inverted dropout).

        ``x`` is ``[N, ...]`` with N = T * B sample-rows whose keys are ``keys [N]``; one decision per
        element, position ``i`` = row-major index over ``x.shape[1:]``. The number of positions is read from
        ``Shape(x)`` at run time, so any static or dynamic inner shape works.
        """
        b = self.b
        thr = threshold(p)
        levels = 1 << 16
        if thr == 0:
            return b.op("Identity", [x], "kept")
        if thr == levels:
            return b.op("Mul", [x, b.const(np.asarray(0.0, dtype=_NUMPY_OF[dtype]), "zero_f")], "dropped")
        scale = 1.0 / (1.0 - thr / levels)
        shape = b.op("Shape", [x], "shape")
        rows = b.op("Max", [b.op("Shape", [x], "rows", start=0, end=1), b.i64([1], "one")], "rows_min1")
        n_pos = b.op("Div", [b.op("Size", [x], "size"), rows], "n_pos")  # [1]; no int64 ReduceProd on CUDA
        n_words = b.op("Div", [b.op("Add", [n_pos, b.i64([1], "one")]), b.i64([2], "two")], "n_words")
        w = b.op("Range", [b.i64(0, "zero"), b.op("Squeeze", [n_words], "nw"), b.i64(1, "one")], "w")
        codes = self.mix(self.xor_const(b.cast(w, TensorProto.UINT32), _C4, "c4"))  # [W]
        site_k = self.site_keys(keys, site)
        words = self.mix(b.op("BitwiseXor", [b.op("Unsqueeze", [site_k, b.i64([1], "ax1")]), codes], "xor"))  # [N, W]
        lo = b.op("Mod", [words, b.u32(1 << 16, "m16")], "lo")
        hi = b.op("BitShift", [words, b.u32(16, "s16h")], "hi", direction="RIGHT")
        halves = b.op(
            "Concat",
            [b.op("Unsqueeze", [lo, b.i64([2], "ax2")]), b.op("Unsqueeze", [hi, b.i64([2], "ax2")])],
            "halves",
            axis=2,
        )
        flat = b.op(
            "Reshape",
            [
                halves,
                b.op("Concat", [b.i64([0], "keep0"), b.op("Mul", [n_words, b.i64([2], "two")])], "flat_shape", axis=0),
            ],
            "flat",
        )
        used = b.op("Slice", [flat, b.i64([0], "s0"), n_pos, b.i64([1], "axis1")], "used")
        keep = b.op("GreaterOrEqual", [used, b.u32(thr, "thr")], "keep")
        factor = b.op(
            "Mul", [b.cast(keep, dtype), b.const(np.asarray(scale, dtype=_NUMPY_OF[dtype]), "scale")], "factor"
        )
        return b.op("Mul", [x, b.op("Reshape", [factor, shape], "factor_shaped")], "masked")


_NUMPY_OF: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
}
