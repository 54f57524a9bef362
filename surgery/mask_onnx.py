"""The hash's ONNX form: ``torch.onnx.export`` translates the hash's custom ops into native uint32 ONNX ops.

``masks`` wraps the hash in the custom ops ``dropwise::mix32`` and ``dropwise::hash_keep`` while exporting;
this table tells the exporter which ONNX nodes each becomes, so the MC graph's masks are bit-identical to
the torch engine's (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .masks import _M32, _MUL1, _MUL2, _position_codes

__all__ = ["onnx_translation_table"]


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
