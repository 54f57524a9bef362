"""DropConnect at inference: the mean rule vs Gaussian moment matching vs sampling (Wan et al. 2013).

Wan et al. argue the mean rule ``a((qW) v)`` is a poor approximation and propose matching the moments of
the pre-activation, ``u ~ N(q W v, q (1 - q) (W * W)(v * v))``, then averaging ``a(u)``. Both are compared
with Monte-Carlo sampling of weight masks (T draws, probabilities averaged), on the zoo's DropConnect MLP
trained on scikit-learn digits.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from dropwise.models.layers import DropConnectLinear
from dropwise.models.zoo import ZOO, build

from .common import Context, Finding, error_percent, figure, fmt, mean_std, nll_of_probs, save, train

SAMPLES = (4, 16, 64)


def run(ctx: Context) -> Finding:
    spec = ZOO["dropconnect_mlp_digits"]
    data = ctx.dataset(spec.dataset)
    x, y = data.test
    results: dict[str, dict[str, list[float]]] = {}

    def record(rule: str, probs: torch.Tensor) -> None:
        entry = results.setdefault(rule, {"error": [], "nll": []})
        entry["error"].append(error_percent(probs, y))
        entry["nll"].append(nll_of_probs(probs, y))

    for seed in ctx.seeds:
        config = spec.train.model_copy(update={"seed": seed})
        model = train(lambda: build("dropconnect_mlp_digits"), data, config, progress=ctx.progress).model
        with torch.no_grad():
            model.eval()
            record("mean rule", F.softmax(model(x), -1))
            gaussian = copy.deepcopy(model)
            for m in gaussian.modules():
                if isinstance(m, DropConnectLinear):
                    m.inference = "gaussian"
            record("Gaussian moment matching", F.softmax(gaussian(x), -1))
            for m in model.modules():
                if isinstance(m, DropConnectLinear):
                    m.train()
            torch.manual_seed(seed)
            draws = torch.stack([F.softmax(model(x), -1) for _ in range(max(SAMPLES))])
            for t in SAMPLES:
                record(f"sampling, T = {t}", draws[:t].mean(0))

    fig, (ax1, ax2), path = figure(ctx, "dropconnect_inference", ncols=2)
    rules = list(results)
    for ax, key, label in ((ax1, "error", "test error (%)"), (ax2, "nll", "test NLL")):
        stats = [mean_std(results[r][key]) for r in rules]
        ax.bar(
            range(len(rules)),
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            capsize=3,
            color=["C0", "C1"] + ["C2"] * len(SAMPLES),
        )
        ax.set_xticks(range(len(rules)), [r.replace(", ", "\n") for r in rules], fontsize=7)
        ax.set_ylabel(label)
    fig.suptitle("DropConnect MLP on digits: inference rules", fontsize=10)
    figure_name = save(fig, path)

    mean_nll = mean_std(results["mean rule"]["nll"])[0]
    gauss_nll = mean_std(results["Gaussian moment matching"]["nll"])[0]
    mc_nll = mean_std(results[f"sampling, T = {max(SAMPLES)}"]["nll"])[0]
    verdict = (
        f"NLL: mean rule {mean_nll:.4f}, Gaussian moment matching {gauss_nll:.4f}, sampling (T = {max(SAMPLES)}) "
        f"{mc_nll:.4f}. "
        + (
            "Moment matching improves on the mean rule, as Wan et al. report. "
            if gauss_nll < mean_nll
            else "Moment matching does not improve on the mean rule here. "
        )
        + (
            "Sampling is best."
            if mc_nll <= min(mean_nll, gauss_nll)
            else "Sampling does not beat the deterministic rules."
        )
    )
    return Finding(
        name="dropconnect_inference",
        title="DropConnect inference: mean rule vs Gaussian moment matching vs sampling (Wan 2013)",
        claim="The mean rule is a poor approximation; Gaussian moment matching does better.",
        figure=figure_name,
        caption=f"The zoo's `dropconnect_mlp_digits` recipe (64-128-128-10, p = 0.5), seeds {list(ctx.seeds)}; "
        f"Gaussian rule with 64 quantile draws. Command: `{ctx.command('dropconnect_inference')}`",
        headers=["inference rule", "test error %", "test NLL"],
        rows=[[r, fmt(*mean_std(results[r]["error"])), fmt(*mean_std(results[r]["nll"]), digits=4)] for r in rules],
        verdict=verdict,
        data=results,
    )
