"""Max-norm with a large learning rate (Srivastava et al. 2014, section 5.1).

The seed: constraining each unit's incoming weights to ``||w||_2 <= c`` lets dropout networks train with a
learning rate about ten times larger without blowing up. Here: a dropout MLP (0.2 input, 0.5 hidden) on
MNIST-5k with SGD + Nesterov momentum at a base learning rate and at 10x, max-norm (c = 3) on and off.
"""

from __future__ import annotations

import math

from dropwise.models.training import TrainConfig
from dropwise.models.zoo.mlp import dropout_mlp
from torch import nn

from .common import Context, Finding, figure, mean_std, save, train

BASE_LR = 0.05
RADIUS = 3.0


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), dropout_mlp(784, (512, 512), 10, p_input=0.2, p_hidden=0.5))


def run(ctx: Context) -> Finding:
    data = ctx.dataset("mnist")
    results: dict[tuple[float, bool], list[float]] = {}
    for lr in (BASE_LR, 10 * BASE_LR):
        for max_norm in (False, True):
            errors = []
            for seed in ctx.seeds:
                config = TrainConfig(
                    epochs=ctx.epochs,
                    lr=lr,
                    batch_size=64,
                    optimizer="sgd",
                    momentum=0.9,
                    patience=5,
                    seed=seed,
                    max_norm=RADIUS if max_norm else None,
                )
                try:
                    errors.append(train(_mlp, data, config, progress=ctx.progress).test_error)
                except RuntimeError:  # the training loop refuses a non-finite loss: the run diverged
                    errors.append(math.nan)
            results[(lr, max_norm)] = errors

    fig, ax, path = figure(ctx, "max_norm")
    labels, means, stds = [], [], []
    for (lr, mn), errors in results.items():
        finite = [e for e in errors if math.isfinite(e)]
        m, s = mean_std(finite) if finite else (math.nan, 0.0)
        labels.append(f"lr {lr:g}\n{'max-norm' if mn else 'no max-norm'}")
        means.append(m if math.isfinite(m) else 0.0)
        stds.append(s)
    bars = ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color=["C0", "C1", "C0", "C1"])
    for bar, errors in zip(bars, results.values(), strict=True):
        diverged = sum(not math.isfinite(e) for e in errors)
        if diverged:
            ax.annotate(f"{diverged}/{len(errors)} diverged", (bar.get_x() + 0.05, bar.get_height() + 0.2), fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_title("Dropout MLP on MNIST-5k: max-norm (c = 3) and a 10x learning rate")
    figure_name = save(fig, path)

    def summary(key: tuple[float, bool]) -> tuple[float, int]:
        finite = [e for e in results[key] if math.isfinite(e)]
        return (mean_std(finite)[0] if finite else math.nan), len(results[key]) - len(finite)

    hi_off, div_off = summary((10 * BASE_LR, False))
    hi_on, div_on = summary((10 * BASE_LR, True))
    lo_off, _ = summary((BASE_LR, False))
    lo_on, _ = summary((BASE_LR, True))
    learns = math.isfinite(hi_on) and hi_on <= 2 * lo_on + 1.0  # within reach of the base learning rate
    stops_divergence = div_off > div_on
    verdict = (
        f"At lr {10 * BASE_LR:g}: without max-norm {hi_off:.2f}% test error ({div_off} runs diverged), with "
        f"max-norm {hi_on:.2f}% ({div_on} diverged); at lr {BASE_LR:g}: {lo_off:.2f}% vs {lo_on:.2f}%. "
        + (
            "Max-norm makes the 10x learning rate usable, as the seed says."
            if learns and (stops_divergence or hi_on < hi_off)
            else f"Max-norm stops the divergence, but at this rate the network still does not learn ({hi_on:.2f}% "
            f"error against {lo_on:.2f}% at the base rate): the claim holds only in part here."
            if stops_divergence
            else "Here max-norm does not make the 10x learning rate better: the seed's claim is not reproduced."
        )
    )
    rows = []
    for (lr, mn), errors in results.items():
        finite = [e for e in errors if math.isfinite(e)]
        m, s = mean_std(finite) if finite else (math.nan, 0.0)
        rows.append([lr, "on" if mn else "off", f"{m:.2f} ± {s:.2f}", len(errors) - len(finite)])
    return Finding(
        name="max_norm",
        title="Max-norm with a 10x learning rate (Srivastava 2014)",
        claim="Max-norm lets a dropout network train with a much larger learning rate.",
        figure=figure_name,
        caption=f"MLP 784-512-512-10, dropout 0.2 / 0.5, SGD with Nesterov momentum 0.9, cosine schedule, up to "
        f"{ctx.epochs} epochs, seeds {list(ctx.seeds)}. Command: `{ctx.command('max_norm')}`",
        headers=["learning rate", "max-norm", "test error %", "diverged runs"],
        rows=rows,
        verdict=verdict,
        data={f"lr={lr:g},max_norm={mn}": errors for (lr, mn), errors in results.items()},
    )
