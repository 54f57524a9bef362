"""Surgery on models dropwise never built: the README's third-party table (tiny configs, no download).

For each model kind (Hugging Face BERT with sdpa and eager attention, ViT, ConvNeXt with drop_path, a model
whose root ``forward`` gates ``F.dropout`` and calls this project's ``drop_path``) it prints: the sites found
(``find_sites``), fold vs eval (max |folded - eval| of the logits, with the folded model in eval and in train
mode), the split front-end the MC engine took for ``sites="all"`` and ``sites="last"``, seeded
reproducibility (same seed twice, and one row alone vs inside a batch), and the agreement of the engine's MC
mean with naive MC (T independent forwards of ``to_mc``'s model, torch's RNG): the largest z-score
``|mean_engine - mean_naive| / sqrt(se_engine^2 + se_naive^2)`` over rows and classes (``se = std / sqrt(T)``).
Weights are random (seeded), so the figures test the surgery, not a task.

Run: ``python -m bench.thirdparty`` (``--samples 400``).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from dropwise.models.layers import drop_path
from dropwise.surgery import MCEngine, find_sites, fold_with_report, to_mc
from torch import nn


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def bert(impl: str, layers: int = 2, hidden: int = 16, seq: int = 8, batch: int = 4) -> tuple[nn.Module, Any]:
    """A tiny ``BertForSequenceClassification`` (random weights) and a batch of token ids."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 32),
        intermediate_size=4 * hidden,
        max_position_embeddings=max(64, seq),
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval(), torch.randint(0, 100, (batch, seq))


def vit() -> tuple[nn.Module, Any]:
    import transformers

    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.2,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval(), torch.randn(4, 3, 16, 16)


def convnext() -> tuple[nn.Module, Any]:
    import transformers

    cfg = transformers.ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[1, 2],
        num_stages=2,
        drop_path_rate=0.3,
        num_labels=3,
        layer_scale_init_value=1.0,
    )
    torch.manual_seed(0)
    return transformers.ConvNextForImageClassification(cfg).eval(), torch.randn(4, 3, 32, 32)


class RootGated(nn.Module):
    """``F.dropout`` gated by the root's own flag, after a residual block calling the project's ``drop_path``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.block = Residual()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.block(self.body(x)), 0.3, training=self.training))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + drop_path(self.fc(x), 0.2, training=self.training)


def root_gated() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    return RootGated().eval(), torch.randn(4, 6)


MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "BERT (sdpa)": lambda: bert("sdpa"),
    "BERT (eager)": lambda: bert("eager"),
    "ViT": vit,
    "ConvNeXt (drop_path)": convnext,
    "root-gated F.dropout + drop_path()": root_gated,
}


def _naive(model: nn.Module, x: Any, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    mc = to_mc(model, example_input=x)
    torch.manual_seed(1)
    with torch.no_grad():
        probs = torch.stack([_logits(mc(x)).softmax(-1) for _ in range(samples)])
    return probs.mean(0), probs.std(0, correction=0)


def row(label: str, model: nn.Module, x: Any, samples: int) -> dict[str, Any]:
    """The table's figures for one model."""
    sites = find_sites(model, x)
    with torch.no_grad():
        want = _logits(model(x))
        folded = fold_with_report(model, x).model
        fold_eval = float((_logits(folded(x)) - want).abs().max())
        fold_train = float((_logits(folded.train()(x)) - want).abs().max())
    left = len(find_sites(folded, x))
    out: dict[str, Any] = {"model": label, "sites": len(sites), "fold_eval": fold_eval, "fold_train": fold_train}
    out["left"] = left
    out["kinds"] = sorted({s.kind for s in sites})
    for choice in ("all", "last"):
        engine = MCEngine(model, x, choice)
        out[f"path_{choice}"] = engine.split.frontend or "whole model"
        a, b = engine(x, samples=32, seed=7), engine(x, samples=32, seed=7)
        alone = engine(x[1:2], samples=32, seed=7)
        batch = engine.run_batch(x, [1, 1, x.shape[0] - 2], [32, 32, 32], [3, 7, 9])
        out[f"seeded_{choice}"] = bool(torch.equal(a.probabilities, b.probabilities))
        out[f"row_{choice}"] = float((batch[1].probabilities - alone.probabilities).abs().max())
    engine = MCEngine(model, x, "all")
    res = engine(x, samples=samples, seed=11)
    mean, std = _naive(model, x, samples)
    se = (res.std.pow(2) / samples + std.pow(2) / samples).sqrt().clamp_min(1e-6)
    out["z_max"] = float(((res.probabilities - mean).abs() / se).max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    header = (
        f"{'model':<36} {'sites':>5} {'kinds':<44} {'fold-eval':>9} {'train':>9} {'left':>4} "
        f"{'split all':>11} {'split last':>11} {'seeded':>6} {'row diff':>8} {'z max':>6}"
    )
    print(header)
    for label, build in MODELS.items():
        model, x = build()
        r = row(label, model, x, args.samples)
        print(
            f"{r['model']:<36} {r['sites']:>5} {','.join(r['kinds']):<44} {r['fold_eval']:>9.1e} "
            f"{r['fold_train']:>9.1e} {r['left']:>4} {r['path_all']:>11} {r['path_last']:>11} "
            f"{r['seeded_all'] and r['seeded_last']!s:>6} {max(r['row_all'], r['row_last']):>8.1e} "
            f"{r['z_max']:>6.2f}"
        )


if __name__ == "__main__":
    main()
