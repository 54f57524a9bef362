"""Choosing the dropout rate p by the validation NLL of MC dropout (Gal 2016, "Uncertainty in Deep Learning", §4).

The zoo's recipes use Srivastava et al. (2014)'s rates (input 0.2, hidden 0.5 for the MLP; a 0.5 head for
the CNN), chosen for deterministic accuracy; their MC predictive is underconfident (issue 11). Gal recommends
choosing p by the validation log likelihood of the MC predictive. This study trains variants of a zoo network
with the project's training loop (same recipe, seed and data splits; only the dropout rates or placement
change) and reports for each: deterministic test accuracy, MC (T samples, seeded, ``mc_predict``) test
accuracy, NLL and ECE (15 bins), and the MC NLL on the VALIDATION split, the selection criterion. The variant
with the best validation MC NLL is picked and compared with the recipe on test: does MC get better (NLL and
ECE) without losing more than 0.3 accuracy points? Nothing is asserted; the zoo recipes are not changed here.

Variants, ``mlp_digits`` (recipe: ``dropout_mlp`` p_input 0.2, p_hidden 0.5, max-norm 3):
  recipe; p_hidden in {0.1, 0.2, 0.3} with the recipe's p_input 0.2; dropout only before the head
  (p_input 0, no dropout after the first hidden layer, dropout p in {0.2, 0.5} after the last one).
Variants, ``cnn_mnist`` (recipe: p_block 0.1, p_spatial 0.1, p_head 0.5, Cutout):
  recipe; p_head in {0.1, 0.25}; dropout only before the head (p_block 0, p_spatial 0, p_head 0.5).

Run: ``python -m bench.dropout_rate_study --networks mlp_digits,cnn_mnist --samples 32 --out study.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from dropwise.models.data import Dataset, load_dataset
from dropwise.models.training import seed_everything, train_model
from dropwise.models.zoo.cnn import dropblock_cnn
from dropwise.models.zoo.mlp import dropout_mlp
from dropwise.models.zoo.registry import ZOO
from dropwise.surgery import mc_predict
from dropwise.surgery.evaluate_metrics import accuracy, ece, nll
from torch import nn

MAX_ACCURACY_LOSS = 0.003
"""The most test accuracy (fraction) a new recipe may lose against the current one (issue 11)."""
EVAL_BATCH = 512


def _mlp_head_only(p: float) -> Callable[[], nn.Module]:
    """The recipe's MLP with dropout only between the last hidden layer and the head."""

    def make() -> nn.Module:
        k = ZOO["mlp_digits"].kwargs
        layers: list[nn.Module] = []
        width = k["in_features"]
        for h in k["hidden"]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.Dropout(p), nn.Linear(width, k["out_features"])]
        return nn.Sequential(*layers)

    return make


def variants(network: str) -> dict[str, Callable[[], nn.Module]]:
    """Variant name -> builder of the untrained network (called under the recipe's seed)."""
    kwargs = ZOO[network].kwargs
    if network == "mlp_digits":

        def mlp(**change: float) -> Callable[[], nn.Module]:
            return lambda: dropout_mlp(**{**kwargs, **change})

        return {
            "recipe (p_input 0.2, p_hidden 0.5)": mlp(),
            "p_input 0.2, p_hidden 0.3": mlp(p_hidden=0.3),
            "p_input 0.2, p_hidden 0.2": mlp(p_hidden=0.2),
            "p_input 0.2, p_hidden 0.1": mlp(p_hidden=0.1),
            "head only, p 0.5": _mlp_head_only(0.5),
            "head only, p 0.2": _mlp_head_only(0.2),
        }
    if network == "cnn_mnist":

        def cnn(**change: float) -> Callable[[], nn.Module]:
            return lambda: dropblock_cnn(**{**kwargs, **change})

        return {
            "recipe (p_block 0.1, p_spatial 0.1, p_head 0.5)": cnn(),
            "p_head 0.25": cnn(p_head=0.25),
            "p_head 0.1": cnn(p_head=0.1),
            "head only (p_block 0, p_spatial 0), p_head 0.5": cnn(p_block=0.0, p_spatial=0.0),
        }
    raise SystemExit(f"no variants defined for {network!r}; choose mlp_digits or cnn_mnist")


@dataclass
class Row:
    """Metrics of one trained variant."""

    network: str
    variant: str
    test_acc_det: float
    test_acc_mc: float
    test_nll_mc: float
    test_ece_mc: float
    test_nll_det: float
    test_ece_det: float
    val_nll_mc: float
    epochs: int
    seconds: float


def _det_probs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [torch.softmax(model(x[i : i + EVAL_BATCH]), dim=-1) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out).numpy().astype(np.float64)


def _mc_probs(model: nn.Module, x: torch.Tensor, samples: int, seed: int) -> np.ndarray:
    result = mc_predict(model, x, samples=samples, seed=seed)
    assert result.probabilities is not None
    return result.probabilities.detach().numpy().astype(np.float64)


def run_variant(
    network: str, name: str, make: Callable[[], nn.Module], dataset: Dataset, samples: int, seed: int
) -> Row:
    """Train one variant with the zoo recipe's training config and measure it."""
    config = ZOO[network].train
    seed_everything(config.seed)
    model = make()
    start = time.perf_counter()
    result = train_model(model, dataset, config, progress=False)
    seconds = time.perf_counter() - start
    (x_val, y_val), (x_test, y_test) = dataset.val, dataset.test
    yv, yt = y_val.numpy(), y_test.numpy()
    det = _det_probs(model, x_test)
    mc_test = _mc_probs(model, x_test, samples, seed)
    mc_val = _mc_probs(model, x_val, samples, seed)
    return Row(
        network=network,
        variant=name,
        test_acc_det=accuracy(det, yt),
        test_acc_mc=accuracy(mc_test, yt),
        test_nll_mc=nll(mc_test, yt),
        test_ece_mc=ece(mc_test, yt, bins=15),
        test_nll_det=nll(det, yt),
        test_ece_det=ece(det, yt, bins=15),
        val_nll_mc=nll(mc_val, yv),
        epochs=result.epochs,
        seconds=seconds,
    )


def verdict(rows: list[Row]) -> dict[str, Any]:
    """Pick the variant with the best validation MC NLL and compare it with the recipe (the first row) on test."""
    recipe = rows[0]
    best = min(rows, key=lambda r: r.val_nll_mc)
    acc_loss = recipe.test_acc_det - best.test_acc_det
    mc_acc_loss = recipe.test_acc_mc - best.test_acc_mc
    better = best.test_nll_mc < recipe.test_nll_mc and best.test_ece_mc < recipe.test_ece_mc
    keeps_accuracy = acc_loss <= MAX_ACCURACY_LOSS and mc_acc_loss <= MAX_ACCURACY_LOSS
    return {
        "picked": best.variant,
        "picked_is_recipe": best is recipe,
        "mc_test_nll_change": best.test_nll_mc - recipe.test_nll_mc,
        "mc_test_ece_change": best.test_ece_mc - recipe.test_ece_mc,
        "det_accuracy_loss_points": 100 * acc_loss,
        "mc_accuracy_loss_points": 100 * mc_acc_loss,
        "mc_better_on_test": better,
        "within_accuracy_budget": keeps_accuracy,
        "change_recipe": (best is not recipe) and better and keeps_accuracy,
    }


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = (
        "| network | variant | acc det | acc MC | NLL MC | ECE MC | NLL det | ECE det | **val NLL MC** | epochs |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.network} | {r.variant} | {100 * r.test_acc_det:.2f} | {100 * r.test_acc_mc:.2f} | "
            f"{r.test_nll_mc:.4f} | {r.test_ece_mc:.4f} | {r.test_nll_det:.4f} | {r.test_ece_det:.4f} | "
            f"{r.val_nll_mc:.4f} | {r.epochs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--networks", default="mlp_digits", help="comma-separated: mlp_digits,cnn_mnist")
    parser.add_argument("--samples", type=int, default=32, help="MC samples T")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MC masks")
    parser.add_argument("--out", default=None, help="write the rows and verdicts as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"samples": args.samples, "seed": args.seed, "networks": {}}
    for network in [n.strip() for n in args.networks.split(",") if n.strip()]:
        dataset = load_dataset(ZOO[network].dataset)
        rows = []
        for name, make in variants(network).items():
            rows.append(run_variant(network, name, make, dataset, args.samples, args.seed))
            print(f"{network}: {name}: done in {rows[-1].seconds:.1f} s", flush=True)
        result = verdict(rows)
        report["networks"][network] = {"rows": [asdict(r) for r in rows], "verdict": result}
        print(table(rows))
        print(json.dumps(result, indent=2))
        if args.out:  # written after each network, so a finished network survives an interrupted run
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
