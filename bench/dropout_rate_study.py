"""Choosing the dropout rate p by the validation NLL of MC dropout (Gal 2016, "Uncertainty in Deep Learning", §4).

Srivastava et al. (2014)'s rates (input 0.2, hidden 0.5 for the MLP; a 0.5 head for the CNN) are chosen for
deterministic accuracy; the MC predictive of networks trained with them is underconfident (issue 11). Gal
recommends choosing p by the validation log likelihood of the MC predictive. This study trains variants of a zoo
network with the project's training loop (the zoo recipe's ``TrainConfig`` and data splits; only the dropout
rates or placement change) and reports for each: deterministic test accuracy, MC (T samples, seeded,
``mc_predict``) test accuracy, NLL and ECE (15 bins), and the MC NLL on the VALIDATION split, the selection
criterion. With ``--seeds N`` every variant is trained with N training seeds (the recipe's seed, then +100,
+200, ...: weights, shuffling, masks; the splits stay fixed) and the table gives the mean and the spread (min-max)
over seeds. The variant with the best mean validation MC NLL is picked; it *holds* when on every seed it beats the
first variant (the reference) on validation MC NLL and on test MC NLL and ECE.
The recipe should change when the pick holds and loses at most 0.3 accuracy points (mean over seeds,
deterministic and MC). Nothing is asserted; this bench does not change the zoo.

Variants, ``mlp_digits`` (Srivastava's rates, ``dropout_mlp`` p_input 0.2, p_hidden 0.5, max-norm 3, first):
  p_hidden in {0.1, 0.2, 0.3} with p_input 0.2; dropout only before the head (p_input 0, p_hidden [0, p] for
  p in {0.2, 0.5}).
Variants, ``cnn_mnist`` (p_block 0.1, p_spatial 0.1, p_head 0.5, Cutout, first):
  p_head in {0.1, 0.25}; dropout only before the head (p_block 0, p_spatial 0, p_head 0.5).
Variants, ``resnet_mnist`` (p_last 0.2 with linear decay, p_head 0.2, first):
  p_head in {0, 0.1}; p_last 0.1.

Run: ``python -m bench.dropout_rate_study --networks mlp_digits,cnn_mnist --seeds 2 --samples 32 --out s.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from dropwise.models.data import Dataset, load_dataset
from dropwise.models.training import seed_everything, train_model
from dropwise.models.zoo.cnn import dropblock_cnn
from dropwise.models.zoo.mlp import dropout_mlp
from dropwise.models.zoo.registry import ZOO
from dropwise.models.zoo.resnet import stochastic_depth_resnet
from dropwise.surgery import mc_predict
from dropwise.surgery.evaluate_metrics import accuracy, ece, nll
from torch import nn

MAX_ACCURACY_LOSS = 0.003
"""The most test accuracy (fraction) a new recipe may lose against the current one (issue 11)."""
EVAL_BATCH = 512
SEED_STRIDE = 100
"""Training seed k (k = 0, 1, ...) is the recipe's seed + k * SEED_STRIDE."""

SRIVASTAVA_MLP = {"p_input": 0.2, "p_hidden": 0.5}
SRIVASTAVA_CNN = {"p_block": 0.1, "p_spatial": 0.1, "p_head": 0.5}
RESNET_RATES = {"p_last": 0.2, "p_head": 0.2}
"""The reference rates each study starts from (the recipes before the study changed them)."""


def variants(network: str) -> dict[str, Callable[[], nn.Module]]:
    """Variant name -> builder of the untrained network (called under the training seed); the reference first."""
    kwargs = ZOO[network].kwargs
    if network == "mlp_digits":

        def mlp(**change: Any) -> Callable[[], nn.Module]:
            return lambda: dropout_mlp(**{**kwargs, **SRIVASTAVA_MLP, **change})

        return {
            "Srivastava (p_input 0.2, p_hidden 0.5)": mlp(),
            "p_input 0.2, p_hidden 0.3": mlp(p_hidden=0.3),
            "p_input 0.2, p_hidden 0.2": mlp(p_hidden=0.2),
            "p_input 0.2, p_hidden 0.1": mlp(p_hidden=0.1),
            "head only, p 0.5": mlp(p_input=0.0, p_hidden=[0.0, 0.5]),
            "head only, p 0.2": mlp(p_input=0.0, p_hidden=[0.0, 0.2]),
        }
    if network == "cnn_mnist":

        def cnn(**change: float) -> Callable[[], nn.Module]:
            return lambda: dropblock_cnn(**{**kwargs, **SRIVASTAVA_CNN, **change})

        return {
            "p_block 0.1, p_spatial 0.1, p_head 0.5": cnn(),
            "p_head 0.25": cnn(p_head=0.25),
            "p_head 0.1": cnn(p_head=0.1),
            "head only (p_block 0, p_spatial 0), p_head 0.5": cnn(p_block=0.0, p_spatial=0.0),
        }
    if network == "resnet_mnist":

        def resnet(**change: float) -> Callable[[], nn.Module]:
            return lambda: stochastic_depth_resnet(**{**kwargs, **RESNET_RATES, **change})

        return {
            "p_last 0.2, p_head 0.2": resnet(),
            "p_head 0.1": resnet(p_head=0.1),
            "p_head 0 (DropPath only)": resnet(p_head=0.0),
            "p_last 0.1": resnet(p_last=0.1),
        }
    raise SystemExit(f"no variants defined for {network!r}; choose mlp_digits, cnn_mnist or resnet_mnist")


@dataclass
class Row:
    """Metrics of one trained variant."""

    network: str
    variant: str
    train_seed: int
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
    network: str,
    name: str,
    make: Callable[[], nn.Module],
    dataset: Dataset,
    samples: int,
    seed: int,
    train_seed: int | None = None,
) -> Row:
    """Train one variant with the zoo recipe's training config (its seed unless ``train_seed``) and measure it."""
    config = ZOO[network].train
    if train_seed is not None:
        config = config.model_copy(update={"seed": train_seed})
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
        train_seed=config.seed,
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


METRICS = ("test_acc_det", "test_acc_mc", "test_nll_mc", "test_ece_mc", "test_nll_det", "test_ece_det", "val_nll_mc")


def _by_variant(rows: Sequence[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for r in rows:
        grouped.setdefault(r.variant, []).append(r)
    return grouped


def summary(rows: Sequence[Row]) -> dict[str, dict[str, dict[str, float]]]:
    """Variant -> metric -> mean, min and max over the training seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, group in _by_variant(rows).items():
        out[variant] = {}
        for m in (*METRICS, "epochs"):
            values = np.array([float(getattr(r, m)) for r in group])
            out[variant][m] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    return out


def verdict(rows: Sequence[Row]) -> dict[str, Any]:
    """Pick the variant with the best mean validation MC NLL; compare it with the reference (first variant).

    The pick *holds* when, for every training seed, it beats the reference on validation MC NLL and on test MC
    NLL and ECE. How often it is also the single best variant on validation is reported (close variants trade
    places from seed to seed on a 270-image validation split). Accuracy losses are means over seeds, in points.
    """
    grouped = _by_variant(rows)
    reference = rows[0].variant
    means = summary(rows)
    best = min(grouped, key=lambda v: means[v]["val_nll_mc"]["mean"])
    seeds = sorted({r.train_seed for r in rows})
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        at = {r.variant: r for r in rows if r.train_seed == seed}
        pick, ref = at[best], at[reference]
        per_seed[str(seed)] = {
            "best_on_validation": min(at.values(), key=lambda r: r.val_nll_mc).variant,
            "mc_val_nll_change": pick.val_nll_mc - ref.val_nll_mc,
            "mc_test_nll_change": pick.test_nll_mc - ref.test_nll_mc,
            "mc_test_ece_change": pick.test_ece_mc - ref.test_ece_mc,
            "det_accuracy_loss_points": 100 * (ref.test_acc_det - pick.test_acc_det),
            "mc_accuracy_loss_points": 100 * (ref.test_acc_mc - pick.test_acc_mc),
        }
    holds = all(
        s["mc_val_nll_change"] < 0 and s["mc_test_nll_change"] < 0 and s["mc_test_ece_change"] < 0
        for s in per_seed.values()
    )
    acc_loss = 100 * (means[reference]["test_acc_det"]["mean"] - means[best]["test_acc_det"]["mean"])
    mc_acc_loss = 100 * (means[reference]["test_acc_mc"]["mean"] - means[best]["test_acc_mc"]["mean"])
    keeps_accuracy = max(acc_loss, mc_acc_loss) <= 100 * MAX_ACCURACY_LOSS + 1e-9
    return {
        "reference": reference,
        "picked": best,
        "picked_is_reference": best == reference,
        "train_seeds": seeds,
        "per_seed": per_seed,
        "picked_best_on_validation_seeds": sum(s["best_on_validation"] == best for s in per_seed.values()),
        "pick_holds_on_every_seed": holds,
        "det_accuracy_loss_points_mean": acc_loss,
        "mc_accuracy_loss_points_mean": mc_acc_loss,
        "within_accuracy_budget": keeps_accuracy,
        "change_recipe": best != reference and holds and keeps_accuracy,
    }


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: per variant the mean over seeds, with the min-max spread when there are several."""
    head = (
        "| network | variant | acc det | acc MC | NLL MC | ECE MC | NLL det | ECE det | **val NLL MC** | epochs |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    scale = {"test_acc_det": 100.0, "test_acc_mc": 100.0}
    digits = {"test_acc_det": 2, "test_acc_mc": 2}
    for variant, stats in summary(rows).items():
        cells = []
        for m in (*METRICS, "epochs"):
            k, d = scale.get(m, 1.0), (0 if m == "epochs" else digits.get(m, 4))
            s = stats[m]
            cell = f"{k * s['mean']:.{d}f}"
            if s["min"] != s["max"]:
                cell += f" ({k * s['min']:.{d}f}-{k * s['max']:.{d}f})"
            cells.append(cell)
        lines.append(f"| {rows[0].network} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """The rows of several ``--out`` files (e.g. one per training seed), re-summarised; prints table and verdict."""
    rows: dict[str, list[Row]] = {}
    report: dict[str, Any] = {"merged": list(paths), "networks": {}}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        report.setdefault("samples", part["samples"])
        if part["samples"] != report["samples"]:
            raise SystemExit(f"{path}: T = {part['samples']}, the others {report['samples']}")
        for network, block in part["networks"].items():
            rows.setdefault(network, []).extend(Row(**r) for r in block["rows"])
    for network, network_rows in rows.items():
        result = verdict(network_rows)
        report["networks"][network] = {
            "rows": [asdict(r) for r in network_rows],
            "summary": summary(network_rows),
            "verdict": result,
        }
        print(table(network_rows))
        print(json.dumps(result, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--networks", default="mlp_digits", help="comma-separated: mlp_digits,cnn_mnist,resnet_mnist")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant (recipe seed + 100 k)")
    parser.add_argument(
        "--first-seed-index", type=int, default=0, help="start k here (split one study over several processes)"
    )
    parser.add_argument("--samples", type=int, default=32, help="MC samples T")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MC masks")
    parser.add_argument("--out", default=None, help="write the rows and verdicts as JSON here")
    parser.add_argument(
        "--variants", default=None, help="comma-separated indices of variants (0 = the reference); default all"
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON", help="combine the rows of earlier --out files instead"
    )
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_reports(args.merge)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(merged, f, indent=2)
        return
    if args.seeds < 1 or args.first_seed_index < 0:
        parser.error("--seeds must be at least 1 and --first-seed-index at least 0")
    torch.set_num_threads(1)
    report: dict[str, Any] = {"samples": args.samples, "seed": args.seed, "seeds": args.seeds, "networks": {}}
    for network in [n.strip() for n in args.networks.split(",") if n.strip()]:
        if network not in ZOO:
            parser.error(f"unknown network {network!r}")
        dataset = load_dataset(ZOO[network].dataset)
        base = ZOO[network].train.seed
        rows = []
        for k in range(args.first_seed_index, args.first_seed_index + args.seeds):
            train_seed = base + k * SEED_STRIDE
            chosen = list(variants(network).items())
            if args.variants is not None:
                chosen = [chosen[int(i)] for i in args.variants.split(",")]
            for name, make in chosen:
                rows.append(run_variant(network, name, make, dataset, args.samples, args.seed, train_seed))
                print(f"{network}: {name}, training seed {train_seed}: {rows[-1].seconds:.1f} s", flush=True)
        result = verdict(rows)
        report["networks"][network] = {
            "rows": [asdict(r) for r in rows],
            "summary": summary(rows),
            "verdict": result,
        }
        print(table(rows))
        print(json.dumps(result, indent=2))
        if args.out:  # written after each network, so a finished network survives an interrupted run
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
