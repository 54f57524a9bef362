"""Surgery on Hugging Face transformers models built from tiny configs (no download).

timm and torchvision cannot be installed beside the torch 2.13 CPU wheel here; their classes are recognised
by class name and module path (tests/test_surgery_sites.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers  # the dev extra: a missing transformers fails here instead of skipping the module
from dropwise.models.layers import classic_dropout, drop_path, embedding_dropout
from dropwise.surgery import (
    MCEngine,
    MCModel,
    export_mc_onnx,
    find_sites,
    fold_with_report,
    split,
    to_mc,
)
from dropwise.surgery.outputs import NUM_SAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(impl: str, hidden: float = 0.1, attention: float = 0.1, layers: int = 2):
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=hidden,
        attention_probs_dropout_prob=attention,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval(), torch.randint(0, 50, (2, 8))


def _convnext():
    cfg = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[1, 2],
        num_stages=2,
        drop_path_rate=0.3,
        num_labels=3,
        layer_scale_init_value=1.0,  # the default 1e-6 makes every branch, and so drop-path, invisible
    )
    torch.manual_seed(0)
    return transformers.ConvNextForImageClassification(cfg).eval(), torch.randn(2, 3, 32, 32)


def _vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.2,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval(), torch.randn(2, 3, 16, 16)


def _check_common(model, x) -> None:
    with torch.no_grad():
        want = model(x).logits
    result = fold_with_report(model, x)
    folded = result.model
    assert find_sites(folded, x) == []  # functional gates pinned, module sites removed
    with torch.no_grad():
        assert (folded(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
        folded.train()  # a fine-tuning loop: the folded model stays deterministic and equal to eval
        assert (folded(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
        assert torch.equal(folded(x).logits, folded(x).logits)
    mc = to_mc(model, example_input=x)
    assert isinstance(mc, MCModel) and isinstance(mc, type(model))
    with torch.no_grad():
        a, b = mc(x).logits, mc(x).logits
    assert not torch.equal(a, b)
    sp = split(model, x)
    # transformers 5.x is not fx-traceable: the torch.export front-end captures it
    assert sp.captured and sp.frontend == "export", sp.reason
    with torch.no_grad():
        assert torch.allclose(sp(x).logits, want, atol=1e-6)
    # the engine: seeded MC reproduces, and a row alone equals the same row in a batch
    for sites in (None, "last"):
        engine = MCEngine(model, x, sites)
        assert engine.split.frontend == "export" and engine.rows_independent
        r1, r2 = engine(x, samples=8, seed=11), engine(x, samples=8, seed=11)
        assert torch.equal(r1.probabilities, r2.probabilities)
        assert not torch.equal(r1.probabilities, engine(x, samples=8, seed=12).probabilities)
        batch = engine.run_batch(x, [1, 1], [8, 8], [5, 11])
        alone = engine(x[1:2], samples=8, seed=11)
        assert torch.allclose(batch[1].probabilities, alone.probabilities, atol=1e-6)
        assert float(r1.std.max()) > 0.0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_sites_and_surgery(impl: str) -> None:
    model, x = _bert(impl)
    sites = find_sites(model, x)
    modules = [s for s in sites if s.function is None]
    functional = [s for s in sites if s.function is not None]
    assert len(modules) == 8 and all(s.kind == "dropout" and s.p == pytest.approx(0.1) for s in modules)
    # BertSelfAttention keeps an nn.Dropout only for its p: it never runs
    unused = {s.name for s in modules if not s.called}
    assert unused == {f"bert.encoder.layer.{i}.attention.self.dropout" for i in range(2)}
    kind = "attention_dropout" if impl == "sdpa" else "functional_dropout"
    function = "scaled_dot_product_attention#0" if impl == "sdpa" else "dropout#0"
    assert [(s.name, s.kind, s.function, s.switch) for s in functional] == [
        (f"bert.encoder.layer.{i}.attention.self", kind, function, "parent.training (functional)") for i in range(2)
    ]
    assert all(s.p == pytest.approx(0.1) for s in functional)
    _check_common(model, x)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_attention_dropout_alone_is_switched_on(impl: str) -> None:
    model, x = _bert(impl, hidden=0.0, attention=0.5)
    mc = to_mc(model, example_input=x)
    assert {s.name for s in mc.mc_sites if s.function is not None} == {
        f"bert.encoder.layer.{i}.attention.self" for i in range(2)
    }
    gate = mc.get_submodule("bert.encoder.layer.0.attention.self")
    assert gate.training and not gate.query.training  # the gating module only, not its children
    with torch.no_grad():
        assert not torch.equal(mc(x).logits, mc(x).logits)
    with pytest.warns(UserWarning, match="example_input"):
        to_mc(model)  # without an example the functional sites cannot be found


def test_convnext_drop_path() -> None:
    model, x = _convnext()
    sites = find_sites(model, x)
    assert [s.kind for s in sites] == ["drop_path"] * len(sites)
    ps = sorted(round(s.p, 4) for s in sites)
    assert ps == [0.15, 0.3]  # linspace(0, 0.3, 3 blocks); the p = 0 block gets nn.Identity, no site
    assert all(s.module_class.endswith("ConvNextDropPath") for s in sites)
    _check_common(model, x)


def test_vit() -> None:
    model, x = _vit()
    sites = find_sites(model, x)
    got = {(s.kind, round(s.p, 3)) for s in sites}
    assert ("attention_dropout", 0.2) in got and ("dropout", 0.1) in got
    _check_common(model, x)


class _RootGated(torch.nn.Module):
    """Functional dropout gated by the ROOT's own flag, with a project functional form inside a child."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU())
        self.block = _Residual()
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.body(x))
        return self.head(torch.nn.functional.dropout(h, 0.3, training=self.training))


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + drop_path(self.fc(x), 0.2, training=self.training)


def test_root_gated_functional_dropout_and_own_functional_forms() -> None:
    torch.manual_seed(0)
    model, x = _RootGated().eval(), torch.randn(4, 6)
    sites = find_sites(model, x)
    assert [(s.name, s.kind, s.function, s.switch) for s in sites] == [
        ("block", "drop_path", "drop_path#0", "parent.training (functional)"),
        ("", "functional_dropout", "dropout#0", "parent.training (functional)"),
    ]
    with torch.no_grad():
        want = model(x)
    folded = fold_with_report(model, x).model.train()
    with torch.no_grad():
        assert torch.allclose(folded(x), want) and find_sites(folded, x) == []
    engine = MCEngine(model, x, "last")
    assert engine.split.captured and engine.split.frontend == "export", engine.split.reason
    r1, r2 = engine(x, samples=16, seed=3), engine(x, samples=16, seed=3)
    assert torch.equal(r1.probabilities, r2.probabilities) and float(r1.std.max()) > 0.0
    alone = engine(x[2:3], samples=16, seed=3)
    batch = engine.run_batch(x, [2, 1, 1], [16, 16, 16], [1, 3, 2])
    assert torch.allclose(batch[1].probabilities, alone.probabilities, atol=1e-6)
    # every site: drop_path's draws export as bare aten.rand nodes inside `block`, which no split can key, so
    # the engine runs the whole model as its tail, still keyed and reproducible
    every = MCEngine(model, x)
    assert not every.split.captured and "aten.rand" in str(every.split.reason)
    s1, s2 = every(x, samples=16, seed=4), every(x, samples=16, seed=4)
    assert torch.equal(s1.probabilities, s2.probabilities) and float(s1.std.max()) > 0.0
    alone = every(x[2:3], samples=16, seed=4)
    batch = every.run_batch(x, [2, 1, 1], [16, 16, 16], [1, 4, 2])
    assert torch.allclose(batch[1].probabilities, alone.probabilities, atol=1e-6)


def test_mc_onnx_export_with_nested_sites_and_a_root_gate(tmp_path) -> None:
    """export_mc_onnx on BERT sdpa (attention gate that is also a parent) and on a root-gated model."""
    bert_model, tokens = _bert("sdpa", layers=1)
    root_model = _RootGated().eval()
    for model, x, sites in ((bert_model, tokens, None), (root_model, torch.randn(3, 6), "last")):
        path = export_mc_onnx(model, x, tmp_path / "mc.onnx", sites=sites)
        session = ort.InferenceSession(str(path))
        feed = {"input": x.numpy(), NUM_SAMPLES: np.array(16, dtype=np.int64), "seed": np.array(5, dtype=np.int64)}
        first, second = session.run(["probabilities"], feed)[0], session.run(["probabilities"], feed)[0]
        want = MCEngine(model, x, sites)(x, samples=16, seed=5).probabilities.numpy()
        assert np.array_equal(first, second)
        assert np.abs(first - want).max() <= 1e-5


class _OwnForms(torch.nn.Module):
    """The project's functional forms called inside a forward, gated by the module's own flag."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = embedding_dropout(self.embed(tokens), 0.3, training=self.training)
        return self.head(classic_dropout(h.mean(1), 0.4, training=self.training))


def test_project_functional_forms_are_sites_folded_and_keyed() -> None:
    torch.manual_seed(0)
    model, x = _OwnForms().eval(), torch.randint(0, 20, (4, 5))
    sites = find_sites(model, x)
    assert [(s.kind, s.function, round(s.p, 2), s.switch) for s in sites] == [
        ("embedding_dropout", "embedding_dropout#0", 0.3, "parent.training (functional)"),
        ("classic_dropout", "classic_dropout#0", 0.4, "parent.training (functional)"),
    ]
    with torch.no_grad():
        want = model(x)  # classic dropout's eval form: q * h
        folded = fold_with_report(model, x).model.train()
        assert torch.allclose(folded(x), want) and find_sites(folded, x) == []
    engine = MCEngine(model, x)
    r1, r2 = engine(x, samples=16, seed=2), engine(x, samples=16, seed=2)
    assert torch.equal(r1.probabilities, r2.probabilities) and float(r1.std.max()) > 0.0
    batch = engine.run_batch(x, [3, 1], [16, 16], [9, 2])
    assert torch.allclose(batch[1].probabilities, engine(x[3:4], samples=16, seed=2).probabilities, atol=1e-6)


class _TwiceCalled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.drop(h) - self.drop(h)  # zero when both calls share one mask


def test_a_module_called_twice_draws_a_mask_per_call() -> None:
    torch.manual_seed(0)
    model, x = _TwiceCalled().eval(), torch.randn(3, 6)
    result = MCEngine(model, x, task="regression")(x, samples=8, seed=1, return_samples=True)
    assert float(result.samples.abs().max()) > 0.0
