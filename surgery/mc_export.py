"""The MC-dropout ONNX graph: trunk once, T hash-masked tail samples and the summaries, all in-graph.

MC dropout (Gal & Ghahramani 2016) needs T stochastic passes; this graph makes them one ONNX Runtime call:

* inputs: the model's inputs by name (``input_name``, or ``input_names`` for a model with several, e.g.
  ``input_ids`` and ``attention_mask``; one dynamic batch dimension), ``num_samples`` (int64 scalar T, read at run
  time) and ``seed`` (int64 scalar, OPTIONAL: it has an initializer -1, so callers may leave it out);
* the trunk (``dropwise.surgery.split``) runs once on the B rows; its live tensors are expanded to T * B rows
  (sample-major, ``n = t * B + b``) and the rewritten tail of `dropwise.surgery.engine.MCEngine` runs once;
* masks come from the same counter-based hash as the torch engine (`dropwise.surgery.masks`, int64 path):
  a run with ``seed >= 0`` reproduces ``MCEngine(model, x)(x, samples=T, seed=seed)`` exactly (same masks,
  outputs equal up to float rounding);
* ``seed < 0`` or absent: a fresh 62-bit seed is drawn IN THE GRAPH from the mask output of an ONNX
  ``Dropout`` node in training mode applied to a constant. ONNX Runtime's ``EliminateDropout`` rewrite
  removes a Dropout only when its mask output is unused, so this node survives the DEFAULT session
  options, and an unseeded Dropout draws from ONNX Runtime's process-wide Philox generator whose state
  advances with every use: every run and every session gets a different seed (verified in
  ``tests/test_mc_onnx.py``). No ``Bernoulli`` node (inverted in ONNX Runtime) and no unseeded
  ``RandomUniformLike`` (identical streams in two sessions of one process) is used;
* outputs (names from the output table `dropwise.surgery.outputs`): the summaries of
  ``dropwise.surgery.summaries`` (classification: ``probabilities``, ``predictive_entropy``,
  ``expected_entropy``, ``mutual_information``, ``variation_ratio``, ``std``; regression: ``mean``,
  ``std``), then ``samples`` ``[T, B, K]`` when ``return_samples`` (per-sample probabilities for
  classification, values for regression) and for classification ``sample_logits`` ``[T, B, K]``, then
  ``seed_used`` (int64 scalar: feed it back as ``seed`` to
  reproduce the run). Graphs exported before the table named these ``mean_probs`` and ``sample_outputs``
  (per-sample logits); `dropwise.surgery.outputs.rename_legacy` reads them.

The data-dependent T is exported by ``torch.onnx.export`` (dynamo) as an unbacked size taken from the
``num_samples`` tensor (graphs exported before the output table call it ``samples``). The tail runs on
all T * B rows at once (no chunking inside the graph), so every tail op must take a run-time row count:
per-example ``DropConnectConv2d`` switches to its im2col + batched-matmul form while exporting
(`dropwise.models.layers.drop_connect.per_example_conv2d`; ONNX Conv's ``group`` is a constant).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from dropwise.surgery.dynamo_export import export_program
from dropwise.surgery.export import DEFAULT_OPSET
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from .engine import MCEngine, primary_output
from .mask_onnx import onnx_translation_table
from .masks import row_keys, sample_keys
from .outputs import NUM_SAMPLES, mc_graph_output_names
from .sites import Site
from .summaries import SummaryHead

__all__ = ["MCGraph", "add_optional_seed", "export_mc_onnx", "output_names"]

_SEED_BITS = 62  # two groups of 31 bits: each sums exactly even where a reduction goes through float64


def output_names(task: str, return_samples: bool) -> list[str]:
    """Output names of the MC graph, in order (`dropwise.surgery.outputs.mc_graph_output_names`)."""
    return mc_graph_output_names(task, return_samples)


class MCGraph(nn.Module):
    """``forward(x, num_samples, seed)``: the traced body of the MC graph (an `MCEngine` with int64 masks)."""

    def __init__(self, engine: MCEngine, return_samples: bool) -> None:
        super().__init__()
        if not engine.context.exportable:
            raise ValueError("MCGraph needs an engine built with exportable=True")
        self.engine = engine
        self.trunk = engine.trunk
        self.tail = engine.tail
        self.head = SummaryHead(engine.task)
        self.return_samples = return_samples

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        """``forward(*inputs, num_samples, seed)``: summaries (+ per-sample outputs) of T = ``num_samples`` passes
        with masks keyed by ``seed``; ``inputs`` are the model's positional inputs (one for most models)."""
        *inputs, num_samples, seed = args
        x = inputs[0]
        n_samples = num_samples.item()
        torch._check(n_samples >= 1)
        batch = x.shape[0]
        live = self.trunk(*inputs)
        rows = torch.arange(batch, dtype=torch.int64, device=x.device)
        keys = sample_keys(row_keys(seed.reshape(1).expand(batch), rows), num_samples)
        expanded = []
        for tensor, batched in zip(live, self.engine._batched, strict=True):
            if batched:
                tensor = tensor.unsqueeze(0).expand(n_samples, *tensor.shape).reshape(-1, *tensor.shape[1:])
            expanded.append(tensor)
        self.engine.context.keys = keys
        try:
            out = primary_output(self.tail(*expanded))  # logits of a Hugging Face ModelOutput
        finally:
            self.engine.context.keys = None
        per_sample = out.reshape(n_samples, batch, -1)  # type: ignore[arg-type]  # item() of an int64 tensor
        results = tuple(self.head(per_sample))
        if self.return_samples:
            if self.engine.task == "classification":
                results = (*results, torch.softmax(per_sample, dim=-1), per_sample)
            else:
                results = (*results, per_sample)
        return (*results, seed.reshape(()))


def _seed_source(prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes drawing a fresh 62-bit seed from a training-mode Dropout's mask (see the module docstring)."""
    c = f"{prefix}_"
    weights = [1 << i for i in range(_SEED_BITS // 2)]
    nodes = [
        helper.make_node(
            "Constant",
            [],
            [c + "ones"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [2, 31], [1.0] * 62),
        ),
        helper.make_node("Constant", [], [c + "ratio"], value=helper.make_tensor("r", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("Constant", [], [c + "train"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
        helper.make_node("Dropout", [c + "ones", c + "ratio", c + "train"], [c + "kept", c + "mask"]),
        helper.make_node("Cast", [c + "mask"], [c + "bits"], to=TensorProto.INT64),
        helper.make_node(
            "Constant", [], [c + "weights"], value=helper.make_tensor("w", TensorProto.INT64, [31], weights)
        ),
        helper.make_node("Mul", [c + "bits", c + "weights"], [c + "weighted"]),
        helper.make_node("Constant", [], [c + "axis"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", [c + "weighted", c + "axis"], [c + "halves"], keepdims=0),
        helper.make_node(
            "Constant", [], [c + "scale"], value=helper.make_tensor("s", TensorProto.INT64, [2], [1, 1 << 31])
        ),
        helper.make_node("Mul", [c + "halves", c + "scale"], [c + "parts"]),
        helper.make_node("ReduceSum", [c + "parts"], [c + "drawn"], keepdims=0),
    ]
    return nodes, c + "drawn"


def add_optional_seed(model: onnx.ModelProto, seed_name: str = "seed") -> onnx.ModelProto:
    """Make ``seed`` optional (initializer -1) and route a fresh in-graph seed where it is negative."""
    graph = model.graph
    effective = f"{seed_name}_effective"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == seed_name:
                node.input[i] = effective
    for output in graph.output:
        if output.name == seed_name:  # never: seed_used is produced by a node
            raise RuntimeError("the seed input is a graph output")
    source, drawn = _seed_source("dropwise_seed")
    zero = helper.make_node(
        "Constant", [], ["dropwise_seed_zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])
    )
    given = helper.make_node("GreaterOrEqual", [seed_name, "dropwise_seed_zero"], ["dropwise_seed_given"])
    choose = helper.make_node("Where", ["dropwise_seed_given", seed_name, drawn], [effective])
    new_nodes = [*source, zero, given, choose]
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    graph.initializer.append(numpy_helper.from_array(torch.tensor(-1, dtype=torch.int64).numpy(), seed_name))
    return model


def _check_exportable(engine: MCEngine) -> None:
    if not engine.captured:
        warnings.warn(
            f"MC export: the model could not be split ({engine.split.reason}); the whole model runs T times",
            stacklevel=3,
        )


def export_mc_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    path: str | Path,
    *,
    sites: str | Sequence[str | Site] | None = None,
    return_samples: bool = True,
    task: str = "classification",
    input_name: str = "input",
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
) -> Path:
    """Export the MC-dropout graph of ``model`` (see the module docstring) to ``path``; returns the path.

    ``sites`` chooses the stochastic sites as in `MCEngine` (others act as in eval mode); ``task`` picks
    the summaries. The example input fixes every dimension but the batch (dynamic). The model's own
    train/eval flags and weights are left untouched (the engine works on a copy).
    """
    path = Path(path)
    engine = MCEngine(model, example_input, sites, task=task, exportable=True)
    _check_exportable(engine)
    graph = MCGraph(engine, return_samples).eval()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    names = list(input_names) if input_names is not None else [input_name]
    if len(names) != len(inputs):
        raise ValueError(f"{len(inputs)} example input(s) but {len(names)} input name(s): {names}")
    example = (*inputs, torch.tensor(2, dtype=torch.int64), torch.tensor(0, dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = export_program(
                graph,
                example,
                input_names=[*names, NUM_SAMPLES, "seed"],
                output_names=output_names(task, return_samples),
                dynamic_shapes={"args": (*({0: batch} for _ in inputs), None, None)},
                opset=opset if opset is not None else DEFAULT_OPSET,
                custom_translation_table=onnx_translation_table(),
            )
        except Exception as exc:  # the exporter raises many kinds; say which model and why, briefly
            lines = [line for line in str(exc).splitlines() if line.strip()]
            summary = next((line for line in lines if "Error" in line), lines[0] if lines else "")
            raise RuntimeError(
                f"MC export of {type(model).__name__} failed: {summary[:300]}. The MC graph needs every tail "
                "op exportable with a run-time number of rows T * B (e.g. no convolution whose group count "
                "depends on the number of rows: ONNX Conv takes it only as a constant)."
            ) from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError(f"MC export of {type(model).__name__} returned no program")
    proto = program.model_proto
    proto = add_optional_seed(proto)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path
