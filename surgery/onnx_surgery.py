"""Surgery on an ONNX graph itself: Dropout nodes found, removed (deterministic) or made MC (counter hash).

For models that arrive as ONNX files (exported from PyTorch, Keras, TF...) there is no module to rewrite,
so the graph is rewritten:

* `find_dropouts` lists the ``Dropout`` nodes of the main graph with their drop ratio (the ``ratio``
  attribute before opset 12, the ``ratio`` input from opset 12 on, a constant initializer or ``Constant``
  node; 0.5 when absent) and their ``training_mode`` (input 2; absent = False = inference);
* `deterministic_graph` deletes them, rewiring their consumers to their input: the graph's inference
  output (an ONNX Dropout in inference mode is the identity, opset 12+ and the older ``is_test`` forms);
* `insert_dropouts` adds training-mode Dropout nodes after named tensors or nodes, `head_input` finds the
  input of the final Gemm / MatMul (for ``--add-dropout-before-head P``): an ONNX file exported in eval mode
  has no Dropout left;
* `mc_graph` replaces each Dropout by the counter-based hash masks of `dropwise.surgery.masks` (emitted by
  `dropwise.surgery.onnx_hash`), inverted dropout ``x * m / (1 - p)`` per element as ONNX Dropout defines
  it (MC dropout, Gal & Ghahramani 2016). The graph has the interface of the torch-exported MC graph
  (`dropwise.surgery.mc_export`; names from the output table `dropwise.surgery.outputs`): the model's
  inputs, ``num_samples`` (int64 scalar T), ``seed`` (int64 scalar, optional: absent or negative draws a
  fresh seed in-graph), the summaries of `dropwise.surgery.summaries` by name, ``samples`` ``[T, B, K]``
  (per-sample probabilities for classification, values for regression), for classification
  ``sample_logits`` ``[T, B, K]`` (the graph's first output per sample), and ``seed_used``.

The T samples are batched: sample-row ``n = t * B + b``. When every tensor crossing from the part of the graph
before the first Dropout (the trunk) into the rest (the tail) has the batch as its first dimension (checked
with ONNX shape inference), the trunk runs once on B rows and only those tensors are tiled T times;
otherwise the graph inputs are tiled and the whole graph runs on T * B rows (`McGraphInfo.split` says which,
and why). Site ``j`` (the j-th Dropout in graph order) draws the masks the torch engine draws for its site
``j``, so a torch model exported with its Dropout nodes gives, seeded, the same masks as
``MCEngine(model)`` (tested). Dropout nodes inside sub-graphs (If / Loop bodies) are refused.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_hash import GraphBuilder, HashOps
from .outputs import NUM_SAMPLES, SAMPLE_LOGITS, SAMPLES

__all__ = [
    "MIN_OPSET",
    "McGraphInfo",
    "OnnxDropout",
    "OnnxSurgeryError",
    "deterministic_graph",
    "find_dropouts",
    "head_input",
    "inference_reference",
    "insert_dropouts",
    "mc_graph",
]

MIN_OPSET = 18
"""The MC graph needs BitwiseXor (opset 18); older graphs are converted up with onnx's version converter."""

_RESERVED_INPUTS = (NUM_SAMPLES, "seed")
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Add", "Sub"}
_LINEAR_TAIL = {"Gemm", "MatMul", "Add", "Sub", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}


class OnnxSurgeryError(ValueError):
    """The ONNX graph cannot be rewritten as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class OnnxDropout:
    """One ``Dropout`` node of the main graph (``index`` = its site number, in graph order)."""

    name: str
    index: int
    node_index: int
    data: str
    output: str
    mask: str | None
    p: float
    ratio_from: str
    training_mode: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able site record for the manifest's ``sites``."""
        return {
            "name": self.name,
            "kind": "dropout",
            "p": self.p,
            "switch": f"training_mode ({self.training_mode})",
            "foldable": True,
            "fold_rule": "delete: inference-mode Dropout is the identity",
            "module_class": "onnx:Dropout",
            "details": {"ratio_from": self.ratio_from, "input": self.data, "output": self.output},
        }


@dataclass
class McGraphInfo:
    """How `mc_graph` built the MC graph."""

    sites: list[OnnxDropout]
    split: bool
    reason: str
    boundary: list[str] = field(default_factory=list)
    trunk_nodes: int = 0
    tail_nodes: int = 0
    head_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (manifest ``export``)."""
        return {
            "sites": [s.name for s in self.sites],
            "split": self.split,
            "reason": self.reason,
            "boundary": list(self.boundary),
            "trunk_nodes": self.trunk_nodes,
            "tail_nodes": self.tail_nodes,
            "head_only": self.head_only,
        }


# ----------------------------------------------------------------------------------------------- helpers


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers and ``Constant`` nodes of the main graph, by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_float", "value_int"):
                    values[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    return values


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's sub-graphs (If / Loop / Scan bodies) read from the enclosing scope (over-approximated)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(i for i in inner.input if i)
                names.update(_subgraph_inputs(inner))
    return names


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node))


def _has_subgraph_dropout(model: onnx.ModelProto) -> bool:
    def walk(graph: onnx.GraphProto, top: bool) -> bool:
        for node in graph.node:
            if not top and node.op_type == "Dropout":
                return True
            for attr in node.attribute:
                graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                if any(walk(g, False) for g in graphs):
                    return True
        return False

    return walk(model.graph, True)


def _rename_inputs(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rename a node's inputs (and reads inside its sub-graphs) by ``mapping``."""
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                _rename_inputs(inner, mapping)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old IR versions also list initializers as inputs)."""
    inits = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _all_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used: set[str] = {o.name for o in model.graph.output}
    for node in model.graph.node:
        used.update(_node_inputs(node))
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inits = {init.name for init in model.graph.initializer}
    real = [i for i in model.graph.input if i.name in used or i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(real)


# ------------------------------------------------------------------------------------------ find / remove


def find_dropouts(model: onnx.ModelProto) -> list[OnnxDropout]:
    """The main graph's Dropout nodes in graph (= execution) order, with their ratios and modes.

    Raises:
        OnnxSurgeryError: a Dropout inside a sub-graph, or a ratio that is not a constant in [0, 1).
    """
    if _has_subgraph_dropout(model):
        raise OnnxSurgeryError("a Dropout node inside an If/Loop/Scan body is not supported")
    constants = _constants(model)
    found: list[OnnxDropout] = []
    for position, node in enumerate(model.graph.node):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"Dropout_{position}"
        ratio_from, p = "default", 0.5
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "ratio" in attrs:
            ratio_from, p = "attribute", float(attrs["ratio"])
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                raise OnnxSurgeryError(f"Dropout {name!r}: its ratio {node.input[1]!r} is not a constant")
            ratio_from, p = "input", float(np.asarray(constants[node.input[1]]).reshape(()))
        if not 0.0 <= p < 1.0:
            raise OnnxSurgeryError(f"Dropout {name!r}: ratio {p} outside [0, 1)")
        mode = "absent (inference)"
        if len(node.input) > 2 and node.input[2]:
            value = constants.get(node.input[2])
            mode = f"input {node.input[2]!r}" if value is None else f"constant {bool(np.asarray(value).reshape(()))}"
        elif attrs.get("is_test") == 0:
            mode = "is_test=0 (training)"
        found.append(
            OnnxDropout(
                name=name,
                index=len(found),
                node_index=position,
                data=node.input[0],
                output=node.output[0],
                mask=node.output[1] if len(node.output) > 1 and node.output[1] else None,
                p=p,
                ratio_from=ratio_from,
                training_mode=mode,
            )
        )
    return found


def _mask_consumers(model: onnx.ModelProto, sites: Sequence[OnnxDropout]) -> list[str]:
    masks = {s.mask for s in sites if s.mask}
    used = [n.name or n.op_type for n in model.graph.node if masks & set(_node_inputs(n))]
    used += [o.name for o in model.graph.output if o.name in masks]
    return used


def deterministic_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without Dropout nodes (their consumers read the Dropout's input directly).

    A Dropout whose output is a graph output becomes an ``Identity`` (the output keeps its name).

    Raises:
        OnnxSurgeryError: a Dropout's mask output is used, or a Dropout sits inside a sub-graph.
    """
    out = copy.deepcopy(model)
    sites = find_dropouts(out)
    if users := _mask_consumers(out, sites):
        raise OnnxSurgeryError(f"the mask output of a Dropout node is used (by {', '.join(users)})")
    outputs = {o.name for o in out.graph.output}
    mapping = {s.output: s.data for s in sites if s.output not in outputs}
    drop = {s.node_index for s in sites}
    nodes = []
    for position, node in enumerate(out.graph.node):
        if position in drop:
            site = next(s for s in sites if s.node_index == position)
            if site.output in outputs:
                nodes.append(helper.make_node("Identity", [site.data], [site.output], name=site.name))
            continue
        _rename_inputs(node, mapping)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _drop_unused_initializers(out)
    kept_info = [v for v in out.graph.value_info if v.name not in {s.output for s in sites}]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def inference_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the SOURCE graph with every Dropout in inference mode (``training_mode`` input removed).

    This is the source graph's own deterministic output, the reference the deterministic graph must equal.
    """
    out = copy.deepcopy(model)
    for node in out.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
            if len(node.input) > 2:
                del node.input[2:]
            for attr in node.attribute:
                if attr.name == "is_test":
                    attr.i = 1
    _drop_unused_initializers(out)
    return out


# ------------------------------------------------------------------------------------------------ insert


def _producers(model: onnx.ModelProto) -> dict[str, tuple[int, onnx.NodeProto]]:
    return {name: (i, node) for i, node in enumerate(model.graph.node) for name in node.output if name}


def head_input(model: onnx.ModelProto) -> str:
    """The data input of the final Gemm / MatMul feeding the first graph output (where a head dropout goes).

    Walks back from the output through Identity / Reshape / Flatten / Squeeze / Unsqueeze / Cast and a bias
    Add or Sub (their non-constant input).

    Raises:
        OnnxSurgeryError: no such Gemm / MatMul (name the tensor with ``--dropout-after`` instead).
    """
    producers = _producers(model)
    constants = _constants(model)
    name = model.graph.output[0].name
    for _ in range(64):
        if name not in producers:
            break
        _, node = producers[name]
        if node.op_type in ("Gemm", "MatMul"):
            return node.input[0]
        if node.op_type not in _PASS_THROUGH:
            break
        data = [i for i in node.input if i and i not in constants]
        if len(data) != 1:
            break
        name = data[0]
    raise OnnxSurgeryError(
        f"no Gemm/MatMul head found before output {model.graph.output[0].name!r}: "
        "name the tensor or node to drop after with --dropout-after NODE --p P"
    )


def insert_dropouts(model: onnx.ModelProto, targets: Iterable[str], p: float) -> onnx.ModelProto:
    """A copy of ``model`` with a training-mode ``Dropout(ratio=p)`` after each target.

    A target is a tensor name or a node name (its first output). Every consumer of the target, but not a
    graph output of that name, reads the dropped tensor.

    Raises:
        OnnxSurgeryError: unknown target, ``p`` outside (0, 1), or a target that is a graph input.
    """
    if not 0.0 < p < 1.0:
        raise OnnxSurgeryError(f"--p must be in (0, 1), got {p}")
    out = copy.deepcopy(model)
    if _opset(out) < 12:
        out = _upgrade(out, 13)
    producers = _producers(out)
    by_node = {node.name: node.output[0] for node in out.graph.node if node.name}
    taken = _all_names(out)
    builder = GraphBuilder("dropwise_inserted", taken)
    inserts: dict[int, list[onnx.NodeProto]] = {}
    mapping: dict[str, str] = {}
    for target in targets:
        tensor = target if target in producers else by_node.get(target)
        if tensor is None:
            inputs = {i.name for i in _graph_inputs(out)}
            where = "a graph input (drop after a node instead)" if target in inputs else "not a tensor or node"
            raise OnnxSurgeryError(f"--dropout-after {target!r}: {where} of the graph")
        if tensor in mapping:
            continue
        ratio = builder.const(np.asarray(p, dtype=np.float32), "ratio")
        train = builder.const(np.asarray(True), "training_mode")
        dropped = builder.fresh("dropped")
        node = helper.make_node("Dropout", [tensor, ratio, train], [dropped], name=dropped)
        inserts.setdefault(producers[tensor][0], []).append(node)
        mapping[tensor] = dropped
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(out.graph.node):
        _rename_inputs(node, mapping)
        nodes.append(node)
        nodes.extend(inserts.get(position, []))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(builder.initializers)
    return out


# ------------------------------------------------------------------------------------------------ MC graph


def _upgrade(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises several types; say what failed
        raise OnnxSurgeryError(
            f"cannot convert the graph from opset {_opset(model)} to {opset}: {str(exc).splitlines()[0]}"
        ) from exc


def _batch_symbols(model: onnx.ModelProto) -> set[str]:
    """dim_param names of the inputs' first dimension; refuses a graph whose batch is fixed."""
    symbols: set[str] = set()
    for value in _graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise OnnxSurgeryError(f"input {value.name!r} has no batch dimension (rank 0 or unknown)")
        first = dims[0]
        if first.HasField("dim_value"):
            raise OnnxSurgeryError(
                f"input {value.name!r} has a fixed batch dimension {first.dim_value}: the MC graph runs "
                "T * B rows, so re-export with a dynamic batch (dynamic_axes / dynamic_shapes)"
            )
        if first.dim_param:
            symbols.add(first.dim_param)
    return symbols


def _shapes(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is only a hint for the split; without it the graph is tiled whole
        return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: v.type for v in values}


def _batched(type_: onnx.TypeProto | None, symbols: set[str]) -> bool:
    if type_ is None or not type_.HasField("tensor_type") or not type_.tensor_type.HasField("shape"):
        return False
    dims = type_.tensor_type.shape.dim
    return bool(dims) and bool(dims[0].dim_param) and dims[0].dim_param in symbols


def _rank(type_: onnx.TypeProto | None) -> int | None:
    if type_ is None or not type_.tensor_type.HasField("shape"):
        return None
    return len(type_.tensor_type.shape.dim)


def _summary_graph(task: str, opset: int, prefix: str) -> onnx.ModelProto:
    """`dropwise.surgery.summaries.SummaryHead` exported once (``[T, B, K]`` in, summaries out)."""
    import torch

    from .export import _quiet_exporter
    from .mc_export import output_names
    from .summaries import SummaryHead

    head = SummaryHead(task).eval()
    example = torch.randn(3, 2, 4)
    names = output_names(task, return_samples=False)[:-1]
    t, b, k = torch.export.Dim("t", min=1), torch.export.Dim("b", min=1), torch.export.Dim("k", min=1)
    with _quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            head,
            (example,),
            input_names=[f"{prefix}per_sample"],
            output_names=names,
            dynamic_shapes={"samples": {0: t, 1: b, 2: k}},
            dynamo=True,
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    return proto


def _summary_nodes(
    task: str, opset: int, per_sample: str, taken: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
    """The summary graph's nodes and initializers, renamed apart from ``taken``, reading ``per_sample``."""
    prefix = "dropwise_summary/"
    proto = _summary_graph(task, opset, prefix)
    outputs = list(proto.graph.output)
    source = proto.graph.input[0].name
    mapping = {source: per_sample}
    internal = {name for node in proto.graph.node for name in node.output} | {
        init.name for init in proto.graph.initializer
    }
    output_names = {o.name for o in outputs}
    for name in internal:
        if name not in output_names and name not in mapping:
            mapping[name] = prefix + name if (prefix + name) not in taken else prefix + "x_" + name
    nodes = []
    for node in proto.graph.node:
        node = copy.deepcopy(node)
        _rename_inputs(node, mapping)
        for i, name in enumerate(node.output):
            node.output[i] = mapping.get(name, name)
        node.name = prefix + (node.name or node.output[0])
        nodes.append(node)
    inits = []
    for init in proto.graph.initializer:
        init = copy.deepcopy(init)
        init.name = mapping.get(init.name, init.name)
        inits.append(init)
    return nodes, inits, outputs


def _reserve_names(model: onnx.ModelProto, reserved: set[str]) -> None:
    """Rename internal tensors of ``model`` that collide with the MC graph's own input / output names."""
    inputs = {i.name for i in _graph_inputs(model)}
    if clash := sorted(inputs & set(_RESERVED_INPUTS)):
        raise OnnxSurgeryError(f"graph input(s) {clash} collide with the MC graph's inputs {NUM_SAMPLES} / seed")
    taken = _all_names(model)
    mapping = {}
    for name in sorted(taken & reserved):
        if name in inputs:
            continue
        new = f"model/{name}"
        while new in taken:
            new += "_"
        mapping[name] = new
    if not mapping:
        return
    for node in model.graph.node:
        _rename_inputs(node, mapping)
        for i, name in enumerate(node.output):
            node.output[i] = mapping.get(name, name)
    for value in [*model.graph.output, *model.graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for init in model.graph.initializer:
        init.name = mapping.get(init.name, init.name)


def mc_graph(
    model: onnx.ModelProto, *, task: str = "classification", return_samples: bool = True
) -> tuple[onnx.ModelProto, McGraphInfo]:
    """The MC-dropout graph of ``model`` (see the module docstring) and how it was built.

    Raises:
        OnnxSurgeryError: no Dropout node (insert one first), a fixed batch dimension, a used mask output,
            an input named ``num_samples`` or ``seed``, or a first output that no Dropout influences.
    """
    from .mc_export import add_optional_seed, output_names

    if task not in ("classification", "regression"):
        raise OnnxSurgeryError(f"task must be classification or regression, not {task!r}")
    work = copy.deepcopy(model)
    if _opset(work) < MIN_OPSET:
        work = _upgrade(work, MIN_OPSET)
    names_out = output_names(task, return_samples)
    _reserve_names(work, set(names_out) | {"seed_effective", "per_sample", *_RESERVED_INPUTS})
    sites = find_dropouts(work)
    if not sites:
        raise OnnxSurgeryError(
            "the graph has no Dropout node (exported in eval mode?): add one with --add-dropout-before-head P "
            "or --dropout-after NODE --p P"
        )
    if users := _mask_consumers(work, sites):
        raise OnnxSurgeryError(f"the mask output of a Dropout node is used (by {', '.join(users)})")
    symbols = _batch_symbols(work)
    graph = work.graph
    inputs = _graph_inputs(work)
    constants = _constants(work)

    # tail = everything downstream of a Dropout; batch-dependent = downstream of a graph input
    tail_tensors: set[str] = set()
    batch_dep: set[str] = {i.name for i in inputs}
    tail_idx: set[int] = set()
    site_at = {s.node_index: s for s in sites}
    for position, node in enumerate(graph.node):
        reads = _node_inputs(node)
        if position in site_at or tail_tensors & set(reads):
            tail_idx.add(position)
            tail_tensors.update(node.output)
        if batch_dep & set(reads):
            batch_dep.update(node.output)
    first_output = graph.output[0].name
    if first_output not in tail_tensors:
        raise OnnxSurgeryError(f"no Dropout node influences the first output {first_output!r}")
    boundary: list[str] = []
    for position in sorted(tail_idx):
        for name in _node_inputs(graph.node[position]):
            if name not in tail_tensors and name in batch_dep and name not in constants and name not in boundary:
                boundary.append(name)
    shapes = _shapes(work)
    unbatched = [
        name for name in boundary if not _batched(shapes.get(name), symbols) or _rank(shapes.get(name)) is None
    ]
    split = not unbatched and bool(symbols)
    if split:
        reason = f"trunk runs once; tail starts at {sites[0].name!r}"
    else:
        why = f"{unbatched[0]!r} has no known batch-first shape" if unbatched else "no symbolic batch dimension"
        reason = f"whole graph runs T*B rows: {why}"
        boundary = [i.name for i in inputs]
        tail_idx = set(range(len(graph.node)))
    head_only = all(graph.node[i].op_type in _LINEAR_TAIL for i in tail_idx if i not in site_at) and split

    taken = _all_names(work)
    builder = GraphBuilder("dropwise_mc", taken)
    hashing = HashOps(builder)
    b = builder
    first_input = inputs[0].name
    batch = b.op("Squeeze", [b.op("Shape", [first_input], "batch_1d", start=0, end=1)], "batch")
    samples_1d = b.op("Unsqueeze", [NUM_SAMPLES, b.i64([0], "ax0")], "samples_1d")
    keys = hashing.sample_keys(hashing.row_keys("seed", batch), NUM_SAMPLES)
    expanded: dict[str, str] = {}
    for name in boundary:
        rank = _rank(shapes.get(name))
        ones: str | None
        if rank is None:
            rank_t = b.op("Shape", [b.op("Shape", [name], "shape")], "rank")
            ones = b.op("Expand", [b.i64([1], "one"), b.op("Sub", [rank_t, b.i64([1], "one")])], "ones")
        else:
            ones = b.i64([1] * (rank - 1), "ones") if rank > 1 else None
        repeats = samples_1d if ones is None else b.op("Concat", [samples_1d, ones], "repeats", axis=0)
        expanded[name] = b.op("Tile", [name, repeats], "tiled")
    head_nodes = list(b.nodes)
    b.nodes.clear()

    trunk: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        if position not in tail_idx:
            trunk.append(node)
            continue
        if position in site_at:
            site = site_at[position]
            data = expanded.get(site.data, site.data)
            dtype = _elem_type(shapes.get(site.data))
            masked = hashing.keep_factor(data, keys, site.index, site.p, dtype)
            b.nodes.append(helper.make_node("Identity", [masked], [site.output], name=f"{site.name}/mc"))
            tail.extend(b.nodes)
            b.nodes.clear()
            continue
        _rename_inputs(node, expanded)
        tail.append(node)

    out_shape = b.op(
        "Concat", [samples_1d, b.op("Unsqueeze", [batch, b.i64([0], "ax0")]), b.i64([-1], "rest")], "ps_shape", axis=0
    )
    per_sample = "per_sample"
    b.nodes.append(helper.make_node("Reshape", [first_output, out_shape], [per_sample], name="dropwise_mc/per_sample"))
    float_out = per_sample
    out_type = _elem_type(shapes.get(first_output))
    if out_type != TensorProto.FLOAT:
        float_out = b.cast(per_sample, TensorProto.FLOAT)
    summary_nodes, summary_inits, summary_outputs = _summary_nodes(task, _opset(work), float_out, taken | set(b._taken))
    tail.extend(b.nodes)
    b.nodes.clear()
    final: list[onnx.NodeProto] = []
    classification = task == "classification"
    if return_samples and classification:
        final.append(helper.make_node("Softmax", [float_out], [SAMPLES], name="dropwise_mc/samples", axis=-1))
        final.append(helper.make_node("Identity", [float_out], [SAMPLE_LOGITS], name="dropwise_mc/sample_logits"))
    elif return_samples:
        final.append(helper.make_node("Identity", [float_out], [SAMPLES], name="dropwise_mc/samples"))
    final.append(helper.make_node("Identity", ["seed"], ["seed_used"], name="dropwise_mc/seed_used"))

    new_inputs = [
        *inputs,
        helper.make_tensor_value_info(NUM_SAMPLES, TensorProto.INT64, []),
        helper.make_tensor_value_info("seed", TensorProto.INT64, []),
    ]
    outputs = list(summary_outputs)
    if return_samples:
        outputs.append(helper.make_tensor_value_info(SAMPLES, TensorProto.FLOAT, ["T", "B", "K"]))
        if classification:
            outputs.append(helper.make_tensor_value_info(SAMPLE_LOGITS, TensorProto.FLOAT, ["T", "B", "K"]))
    outputs.append(helper.make_tensor_value_info("seed_used", TensorProto.INT64, []))
    new_graph = helper.make_graph(
        [*trunk, *head_nodes, *tail, *summary_nodes, *final],
        f"{graph.name or 'model'}_mc",
        new_inputs,
        outputs,
        initializer=[*graph.initializer, *b.initializers, *summary_inits],
    )
    opsets = {o.domain: o.version for o in work.opset_import}
    mc = helper.make_model(
        new_graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=max(work.ir_version, 8),
        producer_name="dropwise",
    )
    mc.functions.extend(work.functions)
    mc = add_optional_seed(mc)
    _drop_unused_initializers(mc)
    try:
        onnx.checker.check_model(mc)
    except onnx.checker.ValidationError as exc:
        raise OnnxSurgeryError(f"the MC graph is invalid: {str(exc).splitlines()[0]}") from exc
    info = McGraphInfo(
        sites=sites,
        split=split,
        reason=reason,
        boundary=boundary,
        trunk_nodes=len(trunk),
        tail_nodes=len(tail_idx),
        head_only=head_only,
    )
    return mc, info


def _elem_type(type_: onnx.TypeProto | None) -> int:
    if type_ is None or not type_.HasField("tensor_type") or not type_.tensor_type.elem_type:
        return TensorProto.FLOAT
    return int(type_.tensor_type.elem_type)
