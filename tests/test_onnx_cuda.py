"""The MC hash on ONNX Runtime's CUDA provider: rewrite to CUDA-implemented ops, bit-identical, placement counted.

Checked without a GPU: the rewritten graph runs on the CPU provider and must give exactly the original's
outputs; the static placement count (`dropwise.surgery.onnx_cuda.CUDA_KERNELS`, transcribed from ONNX
Runtime's kernel table) must find no node the CUDA provider lacks, for every zoo network's MC graph and for
an MC graph made from an ONNX file. With a GPU and onnxruntime-gpu, the session is opened with CPU fallback
disabled.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dropwise.models.data import load_dataset
from dropwise.models.zoo import ZOO, build
from dropwise.surgery.mc_export import export_mc_onnx
from dropwise.surgery.onnx_cuda import CUDA_KERNELS, cuda_compatible, placement
from dropwise.surgery.onnx_surgery import mc_graph
from dropwise.surgery.providers import CUDA_PROVIDER, create_session, cuda_usable
from onnx import TensorProto, helper
from torch import nn

HAS_CUDA = CUDA_PROVIDER in ort.get_available_providers() and cuda_usable()[0]


def _cpu(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    a, b = _cpu(original), _cpu(rewritten)
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize(
    ("op", "dtype", "values"),
    [
        ("BitwiseXor", np.int64, [-(2**63), -1, 0, 1, 2**40 + 7, 2**63 - 1, -(2**35) + 3]),
        ("BitwiseOr", np.int64, [-(2**63), -5, 0, 3, 2**33, 2**62 + 11, 17]),
        ("BitwiseAnd", np.int64, [-7, -1, 0, 9, 2**50 + 1, 2**31, 123456789]),
        ("BitwiseXor", np.uint64, [0, 1, 2**63 + 5, 2**64 - 1, 2**32, 12, 99]),
        ("BitwiseOr", np.uint32, [0, 1, 2**31 + 5, 2**32 - 1, 77, 12, 99]),
        ("BitwiseAnd", np.int32, [-(2**31), -1, 0, 5, 2**31 - 1, -77, 300]),
        ("BitwiseXor", np.uint8, [0, 1, 128, 255, 77, 12, 99]),
    ],
)
def test_bitwise_rewrite_is_exact(op: str, dtype: type, values: list[int]) -> None:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    a = np.array(values, dtype=dtype)
    b = np.roll(a, 3)
    nodes = [helper.make_node(op, ["a", "b"], ["y"]), helper.make_node("BitwiseNot", ["a"], ["n"])]
    shifts = []
    if np.dtype(dtype).kind == "u":
        shift = np.array(5, dtype=dtype)
        nodes += [
            helper.make_node("BitShift", ["a", "k"], ["r"], direction="RIGHT"),
            helper.make_node("BitShift", ["a", "k"], ["l"], direction="LEFT"),
        ]
        shifts = [onnx.numpy_helper.from_array(shift, "k")]
    outputs = ["y", "n"] + (["r", "l"] if shifts else [])
    graph = helper.make_graph(
        nodes,
        "bits",
        [helper.make_tensor_value_info(n, elem, [len(values)]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, elem, [len(values)]) for n in outputs],
        initializer=shifts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewritten = cuda_compatible(model)
    assert placement(model).cpu_count == len(nodes) and placement(rewritten).cpu_count == 0
    _same_outputs(model, rewritten, [{"a": a, "b": b}])
    (y,) = _cpu(rewritten).run(["y"], {"a": a, "b": b})
    expected = {"BitwiseXor": np.bitwise_xor, "BitwiseOr": np.bitwise_or, "BitwiseAnd": np.bitwise_and}[op](a, b)
    assert np.array_equal(y, expected)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_mc_graph_runs_wholly_on_cuda_kernels(name: str, tmp_path: Path) -> None:
    """Every zoo MC graph: bitwise nodes before, none left to the CPU after the rewrite, same outputs."""
    spec = ZOO[name]
    x = load_dataset(spec.dataset).test[0][:3]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_mc_onnx(build(name).eval(), x, tmp_path / "mc.onnx", task=spec.task)
    original = onnx.load(str(path))
    before = placement(original)
    assert before.cpu_count > 0 and not before.unknown
    rewritten = cuda_compatible(original)
    after = placement(rewritten)
    assert after.cpu_count == 0 and not after.unknown, after.to_dict()
    name_in = _input_name(original)
    feeds = [{name_in: x.numpy(), "num_samples": np.array(4), "seed": np.array(s)} for s in (0, 2**40 + 123)]
    _same_outputs(original, rewritten, feeds)


def _input_name(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


def test_onnx_file_mc_graph_runs_wholly_on_cuda_kernels() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).eval()
    net[2].train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (torch.randn(2, 6),),
            input_names=["x"],
            dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    mc, _ = mc_graph(program.model_proto)
    rewritten = cuda_compatible(mc)
    assert placement(mc).cpu_count > 0 and placement(rewritten).cpu_count == 0
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    _same_outputs(mc, rewritten, [{"x": x, "num_samples": np.array(8), "seed": np.array(s)} for s in (1, 2**50)])


def test_kernel_table_covers_the_ops_the_rewrite_emits() -> None:
    for op in ("Div", "Mod", "Mul", "Add", "Sub", "Unsqueeze", "ReduceSum", "Cast", "Identity", "Neg"):
        assert op in CUDA_KERNELS
    assert "int64" in CUDA_KERNELS["ReduceSum"][1] and "uint64" in CUDA_KERNELS["Div"][1]
    assert "uint32" not in CUDA_KERNELS["Where"][1]  # the table keeps the provider's gaps


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_session_without_cpu_fallback(tmp_path: Path) -> None:
    spec = ZOO["mlp_digits"]
    x = load_dataset(spec.dataset).test[0][:4]
    torch.manual_seed(0)
    path = export_mc_onnx(build("mlp_digits").eval(), x, tmp_path / "mc.onnx")
    session, info = create_session(path, "cuda", strict_placement=True)
    assert info.provider == CUDA_PROVIDER and info.placement is not None and info.placement["cpu_nodes"] == 0
    assert info.provider_options[CUDA_PROVIDER]["use_tf32"] == "0"
    feeds = {_input_name(onnx.load(str(path))): x.numpy(), "num_samples": np.array(16), "seed": np.array(5)}
    gpu = session.run(["samples", "seed_used"], feeds)
    cpu = _cpu(onnx.load(str(path))).run(["samples", "seed_used"], feeds)
    assert int(gpu[1]) == int(cpu[1])
    assert np.abs(gpu[0] - cpu[0]).max() <= 1e-4 * max(1.0, float(np.abs(cpu[0]).max()))  # fp32, TF32 off


def test_placement_reported_for_a_tensor_without_cuda_kernel() -> None:
    graph = helper.make_graph(
        [helper.make_node("Where", ["c", "a", "b"], ["y"])],
        "w",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, [2]),
            helper.make_tensor_value_info("a", TensorProto.UINT32, [2]),
            helper.make_tensor_value_info("b", TensorProto.UINT32, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.UINT32, [2])],
    )
    report = placement(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).to_dict()
    assert report["cpu_nodes"] == 1 and report["cpu_ops"] == {"Where(uint32)": 1}


def test_convert_summary_reports_the_mc_placement() -> None:
    """`dropwise convert --device cuda` prints the MC graph's placement (here from a real placement count)."""
    from dropwise.surgery.convert_report import report_summary
    from dropwise.surgery.parity import ParityReport

    graph = helper.make_graph(
        [helper.make_node("BitwiseXor", ["a", "a"], ["y"])],
        "x",
        [helper.make_tensor_value_info("a", TensorProto.UINT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT32, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    report = ParityReport(name="m", version=1, task="classification", tolerance=1e-5)
    report.providers = {"provider": CUDA_PROVIDER, "mc_placement": placement(cuda_compatible(model)).to_dict()}
    lines = report_summary(report)
    assert any("MC graph on CUDA: 0 of" in line for line in lines)
