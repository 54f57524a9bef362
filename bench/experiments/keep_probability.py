"""Test error against the keep probability q (Srivastava et al. 2014, Fig. 9), on MNIST-5k.

An MLP 784-n-n-10 with inverted dropout (keep q) after each hidden layer, q in {0.1, ..., 1.0}:
(a) n fixed, (b) q*n fixed, so the expected number of units kept is constant. The paper finds test error
flat for 0.4 <= q <= 0.8 in (a), and that with q*n fixed small q does better than in (a).
"""

from __future__ import annotations

from dropwise.models.training import TrainConfig
from torch import nn

from .common import Context, Finding, figure, fmt, mean_std, save, train

QS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
N_FIXED = 256
QN_FIXED = 128


def _mlp(width: int, q: float) -> nn.Module:
    p = 1.0 - q
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 28 * 28
    for _ in range(2):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        if p > 0:
            layers.append(nn.Dropout(p))
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def run(ctx: Context) -> Finding:
    data = ctx.dataset("mnist")
    curves: dict[str, dict[str, list[float]]] = {}
    for regime in ("n fixed", "q*n fixed"):
        test_m, test_s, train_m = [], [], []
        for q in QS:
            width = N_FIXED if regime == "n fixed" else round(QN_FIXED / q)
            errors, train_errors = [], []
            for seed in ctx.seeds:
                config = TrainConfig(epochs=ctx.epochs, lr=1e-3, batch_size=64, patience=5, seed=seed)
                trained = train(lambda w=width, q=q: _mlp(w, q), data, config, progress=ctx.progress)
                errors.append(trained.test_error)
                train_errors.append(trained.train_error)
            m, s = mean_std(errors)
            test_m.append(m)
            test_s.append(s)
            train_m.append(mean_std(train_errors)[0])
        curves[regime] = {"test": test_m, "test_std": test_s, "train": train_m}

    fig, ax, path = figure(ctx, "keep_probability")
    for regime, style in (("n fixed", "o-"), ("q*n fixed", "s-")):
        c = curves[regime]
        ax.errorbar(QS, c["test"], yerr=c["test_std"], fmt=style, capsize=3, label=f"test, {regime}")
        ax.plot(QS, c["train"], style.replace("-", ":"), alpha=0.6, label=f"train, {regime}")
    ax.axvspan(0.4, 0.8, color="grey", alpha=0.12, label="0.4 ≤ q ≤ 0.8")
    ax.set_xlabel("keep probability q")
    ax.set_ylabel("classification error (%)")
    ax.set_title(f"MLP on MNIST-5k: n = {N_FIXED} fixed vs q·n = {QN_FIXED} fixed")
    ax.legend(fontsize=7)
    figure_name = save(fig, path)

    fixed = curves["n fixed"]["test"]
    band = [e for q, e in zip(QS, fixed, strict=True) if 0.4 <= q <= 0.8]
    spread = max(band) - min(band)
    best_q = QS[min(range(len(QS)), key=lambda i: fixed[i])]
    noise = max(curves["n fixed"]["test_std"])
    flat = spread <= max(2 * noise, 0.5)
    small_q = [i for i, q in enumerate(QS) if q <= 0.3]
    qn_better = sum(curves["q*n fixed"]["test"][i] < fixed[i] for i in small_q)
    verdict = (
        f"With n fixed, test error varies by {spread:.2f} points over 0.4 ≤ q ≤ 0.8 (largest seed spread "
        f"{noise:.2f}): {'flat within noise, as the paper found' if flat else 'not flat, unlike the paper'}; "
        f"best q = {best_q}. For q ≤ 0.3, keeping q·n fixed gives lower test error in {qn_better} of "
        f"{len(small_q)} cases {'(as the paper found)' if qn_better == len(small_q) else ''}. Without dropout "
        f"(q = 1) the training error is {curves['n fixed']['train'][-1]:.2f}% against "
        f"{curves['n fixed']['test'][-1]:.2f}% test."
    )
    rows = [
        [
            q,
            fmt(curves["n fixed"]["test"][i], curves["n fixed"]["test_std"][i]),
            fmt(curves["q*n fixed"]["test"][i], curves["q*n fixed"]["test_std"][i]),
            round(QN_FIXED / q),
        ]
        for i, q in enumerate(QS)
    ]
    return Finding(
        name="keep_probability",
        title="Test error against the keep probability q (Srivastava 2014, Fig. 9)",
        claim="Test error is flat for 0.4 ≤ q ≤ 0.8 with n fixed; with q·n fixed, small q does better.",
        figure=figure_name,
        caption=f"MLP 784-n-n-10, inverted dropout after each hidden layer, AdamW, up to {ctx.epochs} epochs "
        f"with early stopping, seeds {list(ctx.seeds)} (mean ± std). Command: `{ctx.command('keep_probability')}`",
        headers=["q", "test error %, n = 256", "test error %, q·n = 128", "n when q·n = 128"],
        rows=rows,
        verdict=verdict,
        data={"q": list(QS), **{k: v for k, v in curves.items()}},
    )
