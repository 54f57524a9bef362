"""What the experiments share: a context (output folder, seeds, scale), training, evaluation, plots."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dropwise.models.data import Dataset, load_dataset
from dropwise.models.training import TrainConfig, seed_everything, train_model
from torch import Tensor, nn

COMMAND = "python -m bench.experiments"


@dataclass
class Context:
    """Where figures go, which seeds to average over, and how long each network trains."""

    out: Path
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 10
    progress: bool = False
    _datasets: dict[str, Dataset] = field(default_factory=dict)

    def dataset(self, name: str) -> Dataset:
        """A package-shipped dataset with its fixed seeded splits (loaded once)."""
        if name not in self._datasets:
            self._datasets[name] = load_dataset(name)
        return self._datasets[name]

    def command(self, name: str) -> str:
        """The command that regenerates one experiment."""
        return f"{COMMAND} --only {name}"


@dataclass
class Finding:
    """One experiment's outcome: a figure, a table, and what the numbers say."""

    name: str
    title: str
    claim: str
    figure: str
    caption: str
    headers: list[str]
    rows: list[list[Any]]
    verdict: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained:
    """A trained network with its test error (percent) and training error in eval mode."""

    model: nn.Module
    test_error: float
    train_error: float
    test_nll: float
    epochs: int


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """Eval-mode logits, in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def error_percent(logits: Tensor, y: Tensor) -> float:
    """Classification error in percent."""
    return 100.0 * float((logits.argmax(1) != y).float().mean())


def train(build: Callable[[], nn.Module], dataset: Dataset, config: TrainConfig, *, progress: bool = False) -> Trained:
    """Build under ``config.seed`` and train with the project's training loop (early stopping on val)."""
    seed_everything(config.seed)
    model = build()
    result = train_model(model, dataset, config, progress=progress)
    x_train, y_train = dataset.train
    return Trained(
        model=model,
        test_error=100.0 * (1.0 - result.metrics["test_accuracy"]),
        train_error=error_percent(logits_of(model, x_train), y_train),
        test_nll=result.metrics["test_nll"],
        epochs=result.epochs,
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(m: float, s: float, digits: int = 2) -> str:
    """``m ± s`` for a table cell."""
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def nll_of_probs(probs: Tensor, y: Tensor) -> float:
    """Negative log-likelihood of averaged probabilities."""
    return float(F.nll_loss(probs.clamp_min(1e-12).log(), y))


def figure(ctx: Context, name: str, ncols: int = 1) -> tuple[Any, Any, Path]:
    """A new matplotlib figure (``ncols`` axes side by side) and the path it will be saved to (Agg, no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=(6.0 if ncols == 1 else 4.2 * ncols, 3.8), dpi=110)
    return fig, ax, ctx.out / f"{name}.png"


def save(fig: Any, path: Path) -> str:
    """Save and close a figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path.name


class Timer:
    """Wall-clock seconds of a ``with`` block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
