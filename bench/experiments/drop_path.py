"""DropPath: local vs global drop-path on FractalNet (Larsson 2017); stochastic depth's linear decay vs
uniform rates (Huang 2016).

FractalNet's claim: global drop-path (one column for the whole mini-batch) trains every column to work as
a network on its own, so any single column can be extracted at test time; local drop-path alone does not.
Huang et al.'s claim: a drop rate that grows linearly with depth beats the same rate everywhere, since early
blocks extract low-level features every later block needs. The uniform variant here uses the linear
schedule's mean rate, so both drop the same expected number of blocks.
"""

from __future__ import annotations

import torch
from dropwise.models.layers import DropPath, linear_decay
from dropwise.models.training import TrainConfig
from dropwise.models.zoo.fractalnet import FractalNet
from dropwise.models.zoo.resnet import stochastic_depth_resnet
from torch import Tensor, nn

from .common import Context, Finding, error_percent, figure, fmt, mean_std, save, train

FRACTAL = {  # name -> (p_local, global_fraction)
    "no drop-path": (0.0, 0.0),
    "local only": (0.15, 0.0),
    "local + global (paper)": (0.15, 0.5),
    "global only": (0.0, 1.0),
}
P_LAST = 0.5
DEPTH_BLOCKS = 3


@torch.no_grad()
def _column_error(model: FractalNet, x: Tensor, y: Tensor, column: int) -> float:
    """Test error of one column used alone (the other columns' paths switched off)."""
    model.eval()
    h = model.pool_in(x)
    for i, block in enumerate(model.blocks):
        h = block(h, column)
        if i < len(model.blocks) - 1:
            h = model.pool(h)
    return error_percent(model.head(h), y)


def _resnet(schedule: str) -> nn.Module:
    model = stochastic_depth_resnet(
        in_channels=1, widths=(16, 32), blocks_per_stage=DEPTH_BLOCKS, out_features=10, p_last=P_LAST,
        p_head=0.0, flat_image_shape=(1, 8, 8), stem_pool=False,
    )  # fmt: skip
    gates = [m for m in model.modules() if isinstance(m, DropPath)]
    rates = linear_decay(P_LAST, len(gates))
    for gate, rate in zip(gates, rates, strict=True):
        gate.p = {"linear decay": rate, "uniform": sum(rates) / len(rates), "none": 0.0}[schedule]
    return model


def run(ctx: Context) -> Finding:
    mnist = ctx.dataset("mnist")
    x, y = mnist.test
    fractal: dict[str, dict[str, list[float]]] = {}
    for name, (p_local, global_fraction) in FRACTAL.items():
        entry = fractal.setdefault(name, {"net": [], "col0": [], "col1": [], "col2": []})
        for seed in ctx.seeds:
            config = TrainConfig(epochs=ctx.epochs, lr=3e-3, batch_size=64, patience=5, seed=seed)
            trained = train(
                lambda p=p_local, g=global_fraction: FractalNet(1, (16, 32), 3, 10, p, g), mnist, config,
                progress=ctx.progress,
            )  # fmt: skip
            entry["net"].append(trained.test_error)
            model = trained.model
            assert isinstance(model, FractalNet)
            for c in range(3):
                entry[f"col{c}"].append(_column_error(model, x, y, c))

    digits = ctx.dataset("digits")
    depth: dict[str, list[float]] = {}
    for schedule in ("none", "uniform", "linear decay"):
        depth[schedule] = []
        for seed in ctx.seeds:
            config = TrainConfig(epochs=max(ctx.epochs, 30), lr=3e-3, batch_size=64, patience=8, seed=seed)
            depth[schedule].append(
                train(lambda s=schedule: _resnet(s), digits, config, progress=ctx.progress).test_error
            )

    fig, (ax1, ax2), path = figure(ctx, "drop_path", ncols=2)
    names = list(FRACTAL)
    width = 0.2
    for k, key in enumerate(("net", "col0", "col1", "col2")):
        stats = [mean_std(fractal[n][key]) for n in names]
        ax1.bar(
            [i + (k - 1.5) * width for i in range(len(names))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            capsize=2,
            label="whole net" if key == "net" else f"column {key[-1]} alone",
        )
    ax1.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax1.set_ylabel("test error (%)")
    ax1.set_yscale("log")
    ax1.set_title("FractalNet on MNIST-5k", fontsize=9)
    ax1.legend(fontsize=6)
    schedules = list(depth)
    stats = [mean_std(depth[s]) for s in schedules]
    ax2.bar(
        range(len(schedules)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color=["grey", "C1", "C0"]
    )
    ax2.set_xticks(range(len(schedules)), schedules, fontsize=8)
    ax2.set_ylabel("test error (%)")
    ax2.set_title(f"ResNet, 6 blocks, digits: stochastic depth (p_L = {P_LAST})", fontsize=9)
    figure_name = save(fig, path)

    def worst_column(name: str) -> float:
        return max(mean_std(fractal[name][f"col{c}"])[0] for c in range(3))

    local, global_ = worst_column("local only"), worst_column("global only")
    mixed = worst_column("local + global (paper)")
    lin, uni = mean_std(depth["linear decay"])[0], mean_std(depth["uniform"])[0]
    noise = max(mean_std(v)[1] for v in depth.values())
    verdict = (
        f"FractalNet: the worst single column errs {local:.2f}% after local drop-path only, {mixed:.2f}% with the "
        f"paper's mix and {global_:.2f}% with global drop-path only; "
        + (
            "global drop-path makes the columns usable alone, as Larsson et al. claim. "
            if mixed < local and global_ < local
            else "global drop-path does not make columns better alone here. "
        )
        + f"Stochastic depth on digits: linear decay {lin:.2f}%, uniform {uni:.2f}%, none "
        f"{mean_std(depth['none'])[0]:.2f}% (largest seed spread {noise:.2f}): "
        + (
            "linear decay is better, as Huang et al. report."
            if lin + noise < uni
            else f"linear decay is worse than a uniform rate by {lin - uni:.2f} points, beyond the seed spread: the "
            "claim does not hold for this shallow network on digits."
            if lin - noise > uni
            else "the difference between linear decay and uniform is within noise at this depth and data size."
        )
    )
    rows = [
        [
            f"FractalNet, {n}",
            fmt(*mean_std(fractal[n]["net"])),
            " / ".join(f"{mean_std(fractal[n][f'col{c}'])[0]:.2f}" for c in range(3)),
        ]
        for n in names
    ]
    rows += [[f"ResNet digits, {s}", fmt(*mean_std(depth[s])), ""] for s in schedules]
    return Finding(
        name="drop_path",
        title="DropPath: local vs global (FractalNet) and linear decay vs uniform (stochastic depth)",
        claim="Global drop-path makes each FractalNet column a working network on its own; stochastic depth's "
        "linear decay beats a uniform rate.",
        figure=figure_name,
        caption=f"Left: FractalNet (3 columns, widths 16-32) on MNIST-5k, whole network and each column alone "
        f"(log scale). Right: ResNet with 6 residual blocks on digits, DropPath rates linear in depth (p_L = "
        f"{P_LAST}) vs uniform at their mean vs none. Seeds {list(ctx.seeds)}. Command: `{ctx.command('drop_path')}`",
        headers=["network, variant", "test error %", "columns 1 / 2 / 3 alone, test error %"],
        rows=rows,
        verdict=verdict,
        data={"fractal": fractal, "stochastic_depth": depth},
    )
