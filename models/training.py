"""Training loop for the reference networks: seeds, AdamW or SGD, early stopping, max-norm, DropBlock, Cutout.

One function, :func:`train_model`, trains any ``nn.Module`` on a :class:`dropwise.models.data.Dataset` from a
:class:`TrainConfig`:

- everything random is seeded from ``config.seed`` (weights, shuffling, dropout masks, Cutout);
- AdamW or SGD with momentum, cosine learning-rate decay over the planned steps;
- after every optimiser step: the max-norm projection (Srivastava 2014) when ``config.max_norm`` is set, and
  one step of every ``DropBlockSchedule`` (Ghiasi 2018; drop probability ramps linearly from 0 to its target);
- Cutout (DeVries and Taylor 2017) applied to training batches when ``config.cutout`` is set;
- early stopping on the validation metric (accuracy, or RMSE for regression) with ``patience`` epochs; the
  best weights are restored at the end;
- a tqdm progress bar (stderr) per network.

Metrics are measured in eval mode on the test split: accuracy and NLL for classification; RMSE (standardised
and original units) and Gaussian NLL from MC dropout for regression, where the observation-noise variance
``1/tau`` (Gal and Ghahramani 2016) is fitted on the validation split.

``quick=True`` trains one epoch of a handful of batches and evaluates on a few hundred samples, so that tests
and other parts can build a complete model repository in seconds (its metrics are meaningless).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from dropwise.models.data import Dataset
from dropwise.models.layers import Cutout, DropBlockSchedule, max_norm_
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

QUICK_BATCHES = 3
"""Optimiser steps taken with ``quick=True``."""
QUICK_EVAL = 256
"""Validation / test samples evaluated with ``quick=True``."""
EVAL_BATCH = 512
MC_SAMPLES = 64
"""MC-dropout samples for the regression NLL."""


class CutoutConfig(BaseModel):
    """Cutout augmentation of training images (DeVries and Taylor 2017)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1)
    n_holes: int = Field(default=1, ge=1)
    p: float = Field(default=1.0, ge=0.0, le=1.0)


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run (recorded in the package manifest)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    patience: int = Field(default=5, ge=1)
    seed: int = 0
    max_norm: float | None = Field(default=None, gt=0)
    cutout: CutoutConfig | None = None
    dropblock_schedule: bool = True


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`: test / validation metrics and how training went."""

    metrics: dict[str, float]
    epochs: int
    best_epoch: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's and torch's global generators; return a CPU generator for shuffling."""
    random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def _stochastic_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that sample at inference when put in training mode (torch dropout and ``dropwise.models.layers``)."""
    out = []
    for m in model.modules():
        family = (
            type(m).__module__.startswith("dropwise.models.layers") and hasattr(m, "p") and not isinstance(m, Cutout)
        )
        if isinstance(m, nn.modules.dropout._DropoutNd) or family:
            out.append(m)
    return out


@torch.no_grad()
def _mc_samples(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """``[T, N, K]`` outputs with only the stochastic modules in training mode (BatchNorm stays in eval)."""
    model.eval()
    sites = _stochastic_modules(model)
    for m in sites:
        m.train()
    try:
        return torch.stack([_predict(model, x) for _ in range(samples)])
    finally:
        model.eval()


def _gaussian_nll(y: Tensor, mean: Tensor, var: Tensor) -> float:
    return float((0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)).mean())


def _classification_metrics(model: nn.Module, split: tuple[Tensor, Tensor], prefix: str) -> dict[str, float]:
    model.eval()
    x, y = split
    logits = _predict(model, x)
    return {
        f"{prefix}_accuracy": float((logits.argmax(1) == y).float().mean()),
        f"{prefix}_nll": float(F.cross_entropy(logits, y)),
    }


def _regression_metrics(
    model: nn.Module, val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], target_std: float
) -> dict[str, float]:
    """Eval-mode RMSE and MC-dropout Gaussian NLL with ``1/tau`` fitted on the validation split."""
    model.eval()
    out: dict[str, float] = {}
    for prefix, (x, y) in (("val", val), ("test", test)):
        rmse = float(torch.sqrt(F.mse_loss(_predict(model, x), y)))
        out[f"{prefix}_rmse"] = rmse
        out[f"{prefix}_rmse_original_units"] = rmse * target_std
    val_s = _mc_samples(model, val[0], MC_SAMPLES)
    test_s = _mc_samples(model, test[0], MC_SAMPLES)
    candidates = torch.logspace(-3, 1, 200)
    val_mean, val_var = val_s.mean(0), val_s.var(0)
    nlls = [_gaussian_nll(val[1], val_mean, val_var + c) for c in candidates]
    noise = float(candidates[int(torch.tensor(nlls).argmin())])
    test_mean, test_var = test_s.mean(0), test_s.var(0)
    out["noise_variance"] = noise
    out["mc_samples"] = float(MC_SAMPLES)
    out["test_mc_rmse"] = float(torch.sqrt(F.mse_loss(test_mean, test[1])))
    out["test_nll"] = _gaussian_nll(test[1], test_mean, test_var + noise)
    out["test_mean_predictive_std"] = float(torch.sqrt(test_var + noise).mean())
    return out


def _val_score(task: str, model: nn.Module, val: tuple[Tensor, Tensor]) -> float:
    """Higher is better: accuracy, or negative RMSE for regression."""
    model.eval()
    x, y = val
    out = _predict(model, x)
    if task == "classification":
        return float((out.argmax(1) == y).float().mean())
    return -float(torch.sqrt(F.mse_loss(out, y)))


def _subset(split: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
    """About ``n`` evenly spaced samples (splits are sorted by source index, which may follow the class)."""
    step = max(1, len(split[0]) // n)
    return split[0][::step][:n], split[1][::step][:n]


def train_model(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    quick: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``dataset`` and return its metrics (see the module docstring).

    The model must already be built under the seed (see :func:`seed_everything`) for full reproducibility;
    ``dropwise.zoo_training.train_zoo`` does so.
    """
    task = dataset.task
    start = time.perf_counter()
    cpu_start = time.process_time()
    generator = seed_everything(config.seed)
    x_train, y_train = dataset.train
    val, test = dataset.val, dataset.test
    if quick:
        val, test = _subset(val, QUICK_EVAL), _subset(test, QUICK_EVAL)
    epochs = 1 if quick else config.epochs
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    if quick:
        steps_per_epoch = min(steps_per_epoch, QUICK_BATCHES)
    total_steps = epochs * steps_per_epoch

    optimizer = _make_optimizer(model, config)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if config.schedule == "cosine"
        else None
    )
    dropblock = DropBlockSchedule(model, total_steps) if config.dropblock_schedule else None
    cutout = None
    if config.cutout is not None:
        cutout_generator = torch.Generator().manual_seed(config.seed + 1)
        cutout = Cutout(config.cutout.size, config.cutout.n_holes, config.cutout.p, generator=cutout_generator).train()

    best_score, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc=desc or "train", unit="epoch", disable=not progress, leave=True)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for step, idx in enumerate(_batches(len(x_train), config.batch_size, generator)):
            if step >= steps_per_epoch:
                break
            xb, yb = x_train[idx], y_train[idx]
            if cutout is not None:
                xb = cutout(xb)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(task, model(xb), yb)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch}: loss {float(loss)}")
            loss.backward()
            optimizer.step()
            if config.max_norm is not None:
                max_norm_(model, config.max_norm)
            if scheduler is not None:
                scheduler.step()
            if dropblock is not None:
                dropblock.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        score = _val_score(task, model, val)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_score": score})
        if score > best_score:
            best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", val=f"{abs(score):.4f}", best=best_epoch)
        if epoch - best_epoch >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()

    if task == "classification":
        metrics = {
            **_classification_metrics(model, val, "val"),
            **_classification_metrics(model, test, "test"),
        }
    else:
        target_std = (dataset.target or {}).get("std", 1.0)
        metrics = _regression_metrics(model, val, test, target_std)
    seconds = time.perf_counter() - start
    metrics["seconds"] = seconds
    metrics["cpu_seconds"] = time.process_time() - cpu_start  # all threads of this process
    metrics["epochs"] = float(len(history))
    metrics["best_epoch"] = float(best_epoch)
    return TrainResult(metrics=metrics, epochs=len(history), best_epoch=best_epoch, seconds=seconds, history=history)
