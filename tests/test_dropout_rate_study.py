"""bench.dropout_rate_study: the pick over training seeds, when it holds, and the accuracy budget (no training)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.dropout_rate_study import Row, merge_reports, summary, verdict


def _row(variant: str, seed: int, val: float, nll: float, ece: float, acc: float = 0.98) -> Row:
    return Row(
        network="mlp_digits",
        variant=variant,
        train_seed=seed,
        test_acc_det=acc,
        test_acc_mc=acc,
        test_nll_mc=nll,
        test_ece_mc=ece,
        test_nll_det=0.07,
        test_ece_det=0.02,
        val_nll_mc=val,
        epochs=10,
        seconds=1.0,
    )


def test_pick_by_mean_validation_nll_holds_on_every_seed() -> None:
    rows = [
        _row("ref", 1, 0.15, 0.16, 0.10),
        _row("a", 1, 0.05, 0.06, 0.01),
        _row("b", 1, 0.04, 0.07, 0.02),
        _row("ref", 2, 0.13, 0.14, 0.09),
        _row("a", 2, 0.05, 0.06, 0.01),
        _row("b", 2, 0.08, 0.09, 0.03),
    ]
    v = verdict(rows)
    assert v["picked"] == "a" and v["reference"] == "ref"
    assert v["picked_best_on_validation_seeds"] == 1, "b wins seed 1 on validation, a wins on the mean"
    assert v["pick_holds_on_every_seed"] and v["within_accuracy_budget"] and v["change_recipe"]
    stats = summary(rows)["a"]["val_nll_mc"]
    assert stats == {"mean": 0.05, "min": 0.05, "max": 0.05}


def test_no_change_when_one_seed_is_worse_or_accuracy_drops() -> None:
    worse_ece_on_seed_2 = [
        _row("ref", 1, 0.15, 0.16, 0.10),
        _row("a", 1, 0.05, 0.06, 0.01),
        _row("ref", 2, 0.13, 0.14, 0.02),
        _row("a", 2, 0.05, 0.06, 0.03),
    ]
    v = verdict(worse_ece_on_seed_2)
    assert v["picked"] == "a" and not v["pick_holds_on_every_seed"] and not v["change_recipe"]
    loses_accuracy = [_row("ref", 1, 0.15, 0.16, 0.10, acc=0.980), _row("a", 1, 0.05, 0.06, 0.01, acc=0.975)]
    v = verdict(loses_accuracy)
    assert v["pick_holds_on_every_seed"] and v["det_accuracy_loss_points_mean"] > 0.3
    assert not v["within_accuracy_budget"] and not v["change_recipe"]
    only_reference = [_row("ref", 1, 0.05, 0.06, 0.01), _row("a", 1, 0.15, 0.16, 0.10)]
    assert verdict(only_reference)["picked_is_reference"] and not verdict(only_reference)["change_recipe"]


def test_merge_combines_per_seed_files(tmp_path: Path) -> None:
    seed_1 = [_row("ref", 1, 0.15, 0.16, 0.10), _row("a", 1, 0.05, 0.06, 0.01)]
    seed_2 = [_row("ref", 2, 0.13, 0.14, 0.09), _row("a", 2, 0.07, 0.08, 0.02)]
    paths = []
    for i, rows in enumerate((seed_1, seed_2)):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps({"samples": 32, "networks": {"mlp_digits": {"rows": [r.__dict__ for r in rows]}}}))
        paths.append(str(path))
    merged = merge_reports(paths)["networks"]["mlp_digits"]
    assert merged["verdict"]["train_seeds"] == [1, 2] and merged["verdict"]["change_recipe"]
    assert merged["summary"]["a"]["val_nll_mc"]["min"] == 0.05 and merged["summary"]["a"]["val_nll_mc"]["max"] == 0.07
