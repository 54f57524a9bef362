"""Surgery on Hugging Face transformers models built from tiny configs (no download).

timm and torchvision cannot be installed beside the torch 2.13 CPU wheel here; their classes are recognised
by class name and module path (tests/test_surgery_sites.py).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dropwise.surgery import find_sites, fold, split, to_mc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(impl: str, hidden: float = 0.1, attention: float = 0.1):
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
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
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, drop_path_rate=0.3, num_labels=3
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
    folded = fold(model, x)
    assert all(s.function is not None for s in find_sites(folded, x))  # only gated calls, off in eval
    with torch.no_grad():
        assert (folded(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
    mc = to_mc(model, example_input=x)
    with torch.no_grad():
        a, b = mc(x).logits, mc(x).logits
    assert not torch.equal(a, b)
    sp = split(model, x)
    # transformers' forward is not fx-traceable: the split says why and falls back to the whole model
    assert not sp.captured and sp.reason and "fx" in sp.reason
    with torch.no_grad():
        assert torch.equal(sp(x).logits, want)
    sp_mc = split(mc, x)
    with torch.no_grad():
        torch.manual_seed(3)
        ref = mc(x).logits
        torch.manual_seed(3)
        assert torch.equal(sp_mc(x).logits, ref)


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
