"""MC graphs on ONNX Runtime's CUDA provider without hidden CPU work: kernel table, placement count, rewrite.

ONNX Runtime assigns each node to the first provider that has a kernel for its op type AND its element
type; anything else silently runs on the CPU provider, with a copy across the bus on each side. The CUDA
provider implements no ``BitShift``, ``BitwiseAnd``, ``BitwiseOr``, ``BitwiseXor`` or ``BitwiseNot``
(``docs/OperatorKernels.md`` of microsoft/onnxruntime, the generated list of registered kernels), and the
counter hash of the MC graph (`dropwise.surgery.masks`, `dropwise.surgery.onnx_hash`) is made of exactly those.

`cuda_compatible` rewrites them into integer arithmetic the CUDA provider has, with the same bits:

* ``BitShift(x, k)`` with a constant k: ``Div(x, 2**k)`` (right) or ``Mul(x, 2**k)`` (left, wrapping);
* ``BitwiseAnd(x, 2**m - 1)``: ``Mod(x, 2**m)`` (ONNX integer Mod takes the divisor's sign, so this is
  the two's-complement AND for negative int64 too);
* any other And / Or / Xor through bit planes: with ``s = sum_i 2**i * bit_i(a) * bit_i(b)`` (bits by
  ``Mod(Div(a, 2**i), 2)``, the sum by ``ReduceSum`` over a trailing axis of 32 planes, all int64),
  ``a & b = s``, ``a | b = a + b - s``, ``a ^ b = a + b - 2 s``. Values known to lie in ``[0, 2**32)``
  (a small value-range analysis: casts from 32-bit unsigned types, masks, mods, the hash's outputs) take one
  32-plane pass; other 64-bit values are split into two 32-bit halves (``Div`` / ``Mod`` on uint64).

The CPU provider keeps the original graph (its bitwise kernels are faster); the rewrite is applied when a
CUDA session is opened (`dropwise.surgery.providers.create_session`). `placement` counts the nodes the CUDA
provider has no kernel for, from `CUDA_KERNELS` (transcribed from that table).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_hash import GraphBuilder

__all__ = [
    "BITWISE_OPS",
    "CUDA_KERNELS",
    "KERNEL_TABLE_SOURCE",
    "Placement",
    "cuda_compatible",
    "placement",
]

KERNEL_TABLE_SOURCE = (
    "microsoft/onnxruntime docs/OperatorKernels.md, section 'Operators implemented by CUDAExecutionProvider' "
    "(commit 001d12d2623fd411ce0f83d05abb5e82304a3389, domain ai.onnx, newest opset row)"
)

_F = ("float", "double", "float16", "bfloat16")
_I = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_ALL = (*_F, *_I, "bool")
_ARITH = (*_F, *_I)  # Add, Sub, Mul, Div (opset 14+)
_ORDER = ("float", "double", "float16", "int32", "int64", "uint32", "uint64")  # Less, Greater, ...

#: op type -> (index of the input whose element type selects the kernel, element types with a CUDA kernel)
CUDA_KERNELS: dict[str, tuple[int, frozenset[str]]] = {
    name: (index, frozenset(types))
    for name, index, types in (
        ("Abs", 0, _ARITH),
        ("Add", 0, _ARITH),
        ("Sub", 0, _ARITH),
        ("Mul", 0, _ARITH),
        ("Div", 0, _ARITH),
        ("Mod", 0, ("float", "double", "float16", "bfloat16", "int32", "int64", "uint32", "uint64")),
        ("Neg", 0, ("float", "double", "float16", "bfloat16", "int8", "int16", "int32", "int64")),
        ("Pow", 0, ("float", "double", "float16", "bfloat16", "int32", "int64")),
        ("Equal", 0, (*_ORDER, "bool")),
        ("Less", 0, _ORDER),
        ("LessOrEqual", 0, _ORDER),
        ("Greater", 0, _ORDER),
        ("GreaterOrEqual", 0, _ORDER),
        ("And", 0, ("bool",)),
        ("Or", 0, ("bool",)),
        ("Not", 0, ("bool",)),
        ("Xor", 0, ("bool",)),
        ("Where", 1, ("float", "double", "float16", "bfloat16", "int32", "int64", "uint8")),
        ("Cast", 0, _ALL),
        ("Identity", 0, _ALL),
        ("Shape", 0, _ALL),
        ("Size", 0, _ALL),
        ("Reshape", 0, _ALL),
        ("Squeeze", 0, _ALL),
        ("Unsqueeze", 0, _ALL),
        ("Flatten", 0, _ALL),
        ("Expand", 0, _ALL),
        ("Concat", 0, _ALL),
        ("Slice", 0, _ALL),
        ("Split", 0, _ALL),
        ("Gather", 0, _ALL),
        ("GatherElements", 0, _ALL),
        ("Transpose", 0, _ALL),
        ("ScatterND", 0, _ALL),
        ("ScatterElements", 0, _ALL),
        ("ConstantOfShape", 0, ("int64",)),
        ("Tile", 0, ("float", "double", "float16", "bfloat16", "int32", "int64")),
        ("Range", 0, ("float", "double", "int16", "int32", "int64")),
        ("ReduceSum", 0, ("float", "double", "float16", "bfloat16", "int32", "int64")),
        ("ReduceMean", 0, ("float", "double", "float16", "int32")),
        ("ReduceMax", 0, ("float", "double", "float16", "int32", "int64")),
        ("ReduceMin", 0, ("float", "double", "float16", "int32", "int64", "int8", "uint8")),
        ("ReduceProd", 0, ("float", "double", "float16", "int32")),
        ("ReduceLogSumExp", 0, ("float", "double", "float16")),
        ("ArgMax", 0, ("float", "double", "float16")),
        ("ArgMin", 0, ("float", "double", "float16")),
        ("Clip", 0, ("float", "double", "float16", "int64", "int8", "uint64", "uint8")),
        ("Min", 0, ("float", "double", "float16", "bfloat16", "int32", "int64", "uint32", "uint64")),
        ("Max", 0, ("float", "double", "float16", "bfloat16", "int32", "int64", "uint32", "uint64")),
        ("IsNaN", 0, _F),
        ("IsInf", 0, ("float", "double", "float16", "bfloat16")),
        ("Dropout", 0, _F),
        ("Gemm", 0, _F),
        ("MatMul", 0, _F),
        ("Conv", 0, _F),
        ("ConvTranspose", 0, ("float", "double", "float16")),
        ("MaxPool", 0, ("float", "double", "float16", "int8", "uint8")),
        ("AveragePool", 0, _F),
        ("GlobalAveragePool", 0, ("float", "double", "float16")),
        ("GlobalMaxPool", 0, ("float", "double", "float16")),
        ("BatchNormalization", 0, ("float", "double", "float16")),
        ("LayerNormalization", 0, _F),
        ("Softmax", 0, _F),
        ("LogSoftmax", 0, ("float", "double", "float16")),
        ("Relu", 0, _F),
        ("LeakyRelu", 0, ("float", "double", "float16")),
        ("Sigmoid", 0, _F),
        ("Tanh", 0, _F),
        ("Gelu", 0, _F),
        ("Erf", 0, _F),
        ("Exp", 0, _F),
        ("Log", 0, ("float", "double", "float16")),
        ("Sqrt", 0, _F),
        ("Reciprocal", 0, ("float", "double", "float16")),
        ("Floor", 0, ("float", "double", "float16")),
        ("Ceil", 0, ("float", "double", "float16")),
        ("Round", 0, ("float", "double", "float16")),
        ("Sign", 0, _ARITH),
        ("TopK", 0, ("float", "double", "float16", "int32", "int64")),
        ("OneHot", 0, ("int32", "int64")),
        ("CumSum", 0, ("float", "double", "float16", "int32", "int64", "uint32", "uint64")),
        ("Einsum", 0, ("float", "double", "float16")),
        ("Pad", 0, ("float", "double", "float16", "bool")),
    )
}
"""Element types with a CUDA kernel, per op type (see `KERNEL_TABLE_SOURCE`)."""

BITWISE_OPS = frozenset({"BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"})
"""Op types the CUDA provider does not implement at all and `cuda_compatible` rewrites."""

_NUMPY: dict[int, Any] = {
    TensorProto.UINT8: np.uint8,
    TensorProto.UINT16: np.uint16,
    TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64,
    TensorProto.INT8: np.int8,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
}
_BITS: dict[int, int] = {
    TensorProto.UINT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.UINT32: 32,
    TensorProto.UINT64: 64,
    TensorProto.INT8: 8,
    TensorProto.INT16: 16,
    TensorProto.INT32: 32,
    TensorProto.INT64: 64,
}
_UNSIGNED_SMALL: set[int] = {TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.BOOL}
_PASS_BOUND = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Flatten", "Gather", "Slice", "Transpose"}


def _type_name(elem: int) -> str:
    """``float``, ``int64``, ``bool``... as in OperatorKernels.md (``undefined`` when unknown)."""
    return TensorProto.DataType.Name(elem).lower() if elem else "undefined"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_int":
                    values[node.output[0]] = np.asarray(attr.i, dtype=np.int64)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.asarray(list(attr.ints), dtype=np.int64)
    return values


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph (ONNX shape inference, initializers, constants)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference fails on some custom ops; the known types below still count
        inferred = model
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type")
    }
    types.update({init.name: init.data_type for init in model.graph.initializer})
    for name, value in _constants(model).items():
        types.setdefault(name, helper.np_dtype_to_tensor_dtype(value.dtype))
    return types


@dataclass
class Placement:
    """Where ONNX Runtime's CUDA provider would leave nodes of a graph to the CPU (a static count)."""

    nodes: int
    cpu_nodes: list[dict[str, str]] = field(default_factory=list)
    unknown: list[dict[str, str]] = field(default_factory=list)
    source: str = KERNEL_TABLE_SOURCE

    @property
    def cpu_count(self) -> int:
        """Nodes without a CUDA kernel for their element type."""
        return len(self.cpu_nodes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: counts, the CPU nodes by op type and element type, unknown op types."""
        by_op: dict[str, int] = {}
        for node in self.cpu_nodes:
            key = f"{node['op_type']}({node['dtype']})"
            by_op[key] = by_op.get(key, 0) + 1
        return {
            "nodes": self.nodes,
            "cuda_nodes": self.nodes - self.cpu_count - len(self.unknown),
            "cpu_nodes": self.cpu_count,
            "cpu_ops": by_op,
            "unknown_ops": sorted({n["op_type"] for n in self.unknown}),
            "source": self.source,
        }


def placement(model: onnx.ModelProto) -> Placement:
    """Count the main graph's nodes that have no CUDA kernel for their element type (``Constant`` excluded).

    Op types missing from `CUDA_KERNELS` (and not known to lack a kernel) are listed as ``unknown``.
    """
    types = _elem_types(model)
    report = Placement(nodes=0)
    for node in model.graph.node:
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx"):
            if node.domain not in ("", "ai.onnx"):
                report.unknown.append({"name": node.name, "op_type": f"{node.domain}:{node.op_type}", "dtype": "?"})
                report.nodes += 1
            continue
        report.nodes += 1
        if node.op_type in BITWISE_OPS:
            dtype = _type_name(types.get(node.input[0], 0)) if node.input else "?"
            report.cpu_nodes.append({"name": node.name, "op_type": node.op_type, "dtype": dtype})
            continue
        entry = CUDA_KERNELS.get(node.op_type)
        if entry is None:
            report.unknown.append({"name": node.name, "op_type": node.op_type, "dtype": "?"})
            continue
        index, supported = entry
        name = node.input[index] if len(node.input) > index else ""
        dtype = _type_name(types.get(name, 0)) if name else "?"
        if dtype not in supported:
            report.cpu_nodes.append({"name": node.name, "op_type": node.op_type, "dtype": dtype})
    return report


# ----------------------------------------------------------------------------------------------- rewrite


class _Rewriter:
    """Replaces the bitwise nodes of one graph by arithmetic (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.types = _elem_types(model)
        self.constants = _constants(model)
        taken = {n for node in model.graph.node for n in (*node.input, *node.output, node.name)}
        taken |= {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        self.b = GraphBuilder("dropwise_cuda", taken)
        self.bounded: set[str] = set()  # tensors whose values lie in [0, 2**32)
        self._planes: dict[int, str] = {}

    # value ranges ------------------------------------------------------------------------------------
    def _is_bounded(self, name: str) -> bool:
        if name in self.bounded:
            return True
        value = self.constants.get(name)
        if value is not None and np.issubdtype(value.dtype, np.integer):
            return bool(value.size == 0 or (value.min() >= 0 and int(value.max()) < (1 << 32)))
        return self.types.get(name) in _UNSIGNED_SMALL

    def _track(self, node: onnx.NodeProto) -> None:
        """Record outputs of ``node`` (original or rewritten) known to lie in ``[0, 2**32)``."""
        op, ins = node.op_type, [i for i in node.input if i]
        out = node.output[0] if node.output else ""
        bounded = False
        if op == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            bounded = self.types.get(ins[0]) in _UNSIGNED_SMALL or (
                to in (TensorProto.INT64, TensorProto.UINT64) and self._is_bounded(ins[0])
            )
        elif op in _PASS_BOUND or op == "Concat":
            bounded = all(self._is_bounded(i) for i in (ins[:1] if op != "Concat" else ins))
        elif op in ("BitwiseAnd", "Mod"):
            bounded = any(self._is_bounded(i) for i in ins) if op == "BitwiseAnd" else self._is_bounded(ins[1])
        elif op in ("BitwiseXor", "BitwiseOr", "Where"):
            bounded = all(self._is_bounded(i) for i in (ins if op != "Where" else ins[1:]))
        elif op in ("BitShift", "Div"):
            bounded = self._is_bounded(ins[0])
        elif op == "Range":
            start = self.constants.get(ins[0])
            bounded = start is not None and int(np.asarray(start)) >= 0  # lengths < 2**32 elements
        if bounded:
            self.bounded.add(out)
            self.types.setdefault(out, self.types.get(ins[0], TensorProto.INT64) if ins else TensorProto.INT64)

    # helpers -----------------------------------------------------------------------------------------
    def _const_like(self, value: int, elem: int, hint: str) -> str:
        return self.b.const(np.asarray(value, dtype=_NUMPY[elem]), hint)

    def _powers(self) -> str:
        if 32 not in self._planes:
            self._planes[32] = self.b.i64([1 << i for i in range(32)], "planes")
        return self._planes[32]

    def _and_sum(self, a64: str, b64: str) -> str:
        """``a & b`` of int64 tensors with values in ``[0, 2**32)``, through 32 bit planes."""
        b = self.b
        powers = self._powers()
        two = b.i64(2, "two")
        last = b.i64([-1], "last")
        bits_a = b.op("Mod", [b.op("Div", [b.op("Unsqueeze", [a64, last]), powers]), two], "bits_a")
        bits_b = b.op("Mod", [b.op("Div", [b.op("Unsqueeze", [b64, last]), powers]), two], "bits_b")
        both = b.op("Mul", [b.op("Mul", [bits_a, bits_b], "both"), powers], "weighted")
        return b.op("ReduceSum", [both, last], "and", keepdims=0)

    def _combine(self, op: str, a64: str, b64: str) -> str:
        b = self.b
        s = self._and_sum(a64, b64)
        if op == "BitwiseAnd":
            return s
        total = b.op("Add", [a64, b64], "sum")
        if op == "BitwiseOr":
            return b.op("Sub", [total, s], "or")
        return b.op("Sub", [total, b.op("Mul", [s, b.i64(2, "two")])], "xor")

    def _bitwise(self, node: onnx.NodeProto) -> str:
        b = self.b
        a_name, b_name = node.input[0], node.input[1]
        elem = self.types.get(a_name, TensorProto.INT64)
        if elem not in _BITS:
            raise ValueError(f"{node.op_type} {node.name!r}: element type {elem} is not an integer type")
        narrow = _BITS[elem] <= 32 or (self._is_bounded(a_name) and self._is_bounded(b_name))
        if narrow:
            if _BITS[elem] <= 32 and elem not in _UNSIGNED_SMALL:  # signed: reinterpret as unsigned first
                unsigned = {8: TensorProto.UINT8, 16: TensorProto.UINT16, 32: TensorProto.UINT32}[_BITS[elem]]
                a64 = b.cast(b.cast(a_name, unsigned), TensorProto.INT64)
                b64 = b.cast(b.cast(b_name, unsigned), TensorProto.INT64)
                return b.cast(b.cast(self._combine(node.op_type, a64, b64), unsigned), elem)
            a64 = a_name if elem == TensorProto.INT64 else b.cast(a_name, TensorProto.INT64)
            b64 = b_name if elem == TensorProto.INT64 else b.cast(b_name, TensorProto.INT64)
            result = self._combine(node.op_type, a64, b64)
            return result if elem == TensorProto.INT64 else b.cast(result, elem)
        # 64-bit values of any range: two 32-bit halves through uint64 Div / Mod
        a_u = a_name if elem == TensorProto.UINT64 else b.cast(a_name, TensorProto.UINT64)
        b_u = b_name if elem == TensorProto.UINT64 else b.cast(b_name, TensorProto.UINT64)
        two32 = self._const_like(1 << 32, TensorProto.UINT64, "two32")
        halves = []
        for part in ("Div", "Mod"):
            ha = b.cast(b.op(part, [a_u, two32], "half_a"), TensorProto.INT64)
            hb = b.cast(b.op(part, [b_u, two32], "half_b"), TensorProto.INT64)
            halves.append(b.cast(self._combine(node.op_type, ha, hb), TensorProto.UINT64))
        joined = b.op("Add", [b.op("Mul", [halves[0], two32], "high"), halves[1]], "joined")
        return joined if elem == TensorProto.UINT64 else b.cast(joined, elem)

    def rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Arithmetic nodes computing ``node``'s output bit for bit (``node`` itself when not bitwise)."""
        if node.op_type not in BITWISE_OPS or node.domain not in ("", "ai.onnx"):
            self._track(node)
            return [node]
        b = self.b
        b.nodes.clear()
        elem = self.types.get(node.input[0], TensorProto.INT64)
        out = node.output[0]
        if node.op_type == "BitShift":
            shift = self.constants.get(node.input[1])
            if shift is None:
                raise ValueError(f"BitShift {node.name!r}: the shift amount is not a constant")
            direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "RIGHT")
            factor = (np.ones_like(shift, dtype=np.uint64) << shift.astype(np.uint64)).astype(_NUMPY[elem])
            factor_name = b.const(factor, "pow2")
            result = b.op("Div" if direction == "RIGHT" else "Mul", [node.input[0], factor_name], "shift")
        elif node.op_type == "BitwiseNot":
            if elem in _UNSIGNED_SMALL or elem == TensorProto.UINT64:
                top = self._const_like((1 << _BITS[elem]) - 1, elem, "ones")
                result = b.op("Sub", [top, node.input[0]], "not")
            else:
                result = b.op("Sub", [b.op("Neg", [node.input[0]]), self._const_like(1, elem, "one")], "not")
        else:
            mask = self.constants.get(node.input[1])
            low = None
            if node.op_type == "BitwiseAnd" and elem in _NUMPY and mask is not None and mask.size:
                m = int(mask.flat[0])
                uniform = bool(np.all(mask == mask.flat[0]))
                if uniform and m > 0 and (m & (m + 1)) == 0 and m + 1 <= int(np.iinfo(_NUMPY[elem]).max):
                    low = m + 1  # x & (2**k - 1) == x mod 2**k
            if low is not None:
                result = b.op("Mod", [node.input[0], self._const_like(low, elem, "mod")], "low")
            else:
                result = self._bitwise(node)
        nodes = [*b.nodes, helper.make_node("Identity", [result], [out], name=node.name or out)]
        b.nodes.clear()
        for new in nodes:
            self._track(new)
        self.types[out] = elem
        if node.op_type in ("BitShift", "BitwiseAnd", "BitwiseXor", "BitwiseOr"):
            self._track(node)  # the original's range rule applies to its (same) output
        return nodes


def cuda_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose bitwise nodes are integer arithmetic the CUDA provider implements.

    Bit-identical outputs (tested on the CPU provider against the original). Sub-graphs are not rewritten.
    """
    out = copy.deepcopy(model)
    if not any(node.op_type in BITWISE_OPS for node in out.graph.node):
        return out
    rewriter = _Rewriter(out)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        nodes.extend(rewriter.rewrite(node))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(rewriter.b.initializers)
    return out
