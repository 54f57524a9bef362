"""`evaluate_package`: how trustworthy a package's deterministic and MC-dropout predictions are.

On the package's validation and test splits (or ``data=file.npz``), deterministic vs MC dropout (Gal &
Ghahramani 2016) for T in {8, 32, 100}:

* classification: accuracy, NLL, Brier, ECE (15 bins) with reliability bins; temperature scaling (Guo et al.
  2017) fitted on the validation split for the deterministic predictive and for the MC predictive, the MC
  one in two ways (dividing the per-sample logits, or the log of the MC mean) with the better one (by
  validation NLL) kept; OOD detection (AUROC, FPR at 95% TPR) scored by max probability, predictive entropy,
  mutual information and variation ratio (`dropwise.surgery.evaluate_data` builds the OOD sets for the kind
  of input: images, token sequences), with what the network predicts on each set (its most frequent class
  and that class's share, the mean MC confidence: a set mapped to one class with confidence near 1 is what
  no score can catch); the convergence of each score with T (relative deviation from its T=100 value); the
  risk-coverage curve and its area; the abstention rule: the score that detects OOD best on the validation
  split and its threshold keeping 95% of in-distribution validation inputs, on the scores the service
  answers (max probability of the temperature-scaled MC mean, `dropwise.surgery.calibration`; the other
  scores from the raw passes);
* regression: RMSE, Gaussian NLL and the coverage of the 50/90/95% central intervals (target units), the
  noise variance fitted on the validation split; OOD means inputs outside the range of the in-distribution
  data (`dropwise.surgery.evaluate_data.REGRESSION_OOD_DEFINITION`, stored in the report), detected by the
  MC predictive standard deviation (AUROC, FPR at 95% TPR).

``max_rows`` caps every split and OOD set at its first rows, for a quick look (the splits are stratified, so
the first rows of a split hold every class; the figures get noisier). The report records the wall and CPU
seconds the evaluation took (``seconds``), plotting and writing excluded.

The T passes run once at T=100 through `dropwise.surgery.engine.MCEngine`; since a sample's masks are keyed by
its index t, the first T of them are exactly a T-sample run. `write_evaluation` stores ``evaluation.json`` and
the plots in the package (checksummed by `dropwise.package.add_file`) and a short summary in the manifest
(``evaluation``, ``calibration``, ``abstention``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax, softmax

from . import evaluate_metrics as m
from .calibration import calibrate_mean
from .engine import MCEngine
from .evaluate_data import (
    REGRESSION_OOD_DEFINITION,
    EvalData,
    EvaluationDataError,
    load_npz,
    ood_sets,
    regression_ood_sets,
)
from .summaries import classification_summaries

__all__ = ["DEFAULT_T", "Evaluation", "evaluate_package", "write_evaluation"]

DEFAULT_T: tuple[int, ...] = (8, 32, 100)
CALIBRATION_T = 32
KEEP_TARGET = 0.95
SCORES = ("max_probability", "predictive_entropy", "mutual_information", "variation_ratio")
_CHUNK = 128


@dataclass
class Evaluation:
    """Everything `evaluate_package` measured (``report`` is ``evaluation.json``)."""

    report: dict[str, Any]
    plots: dict[str, bytes] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The short form kept in the manifest and shown by ``GET /v1/models/{name}``."""
        return self.report["summary"]


def _load(package: str | Path, allow_modules: Iterable[str] | None) -> tuple[Any, Any, Any]:
    """(deterministic network, MC network, manifest): the recorded surgery replayed by the one resolver.

    The deterministic network is the package's network as its weights describe it (an MC rewrite's eval
    output is the same); the MC network is the rewritten one when the package records an MC rewrite.
    """
    from dropwise.package import verify_package

    from .sources import resolve_source

    source = resolve_source(str(package), allow_modules=list(allow_modules) if allow_modules else None)
    assert source.path is not None
    manifest = verify_package(source.path)
    mc_model = source.model if any(step.startswith("mc") for step in source.surgery) else source.base
    return source.base.eval(), mc_model, manifest


def _data(manifest: Any, data: str | Path | None, max_rows: int | None) -> EvalData:
    full = _full_data(manifest, data)
    if max_rows is None:
        return full
    return EvalData(
        full.dataset, full.x_val[:max_rows], full.y_val[:max_rows], full.x_test[:max_rows], full.y_test[:max_rows]
    )


def _full_data(manifest: Any, data: str | Path | None) -> EvalData:
    from dropwise.models.data import load_dataset

    name = manifest.training.get("dataset") if isinstance(manifest.training, dict) else None
    if data is not None:
        x, y = load_npz(data, need_y=True)
        assert y is not None
        half = len(x) // 2
        if half < 10:
            raise EvaluationDataError(f"{data}: needs at least 20 rows (half calibrates, half tests)")
        return EvalData(name, x[:half], y[:half], x[half:], y[half:])
    if not name:
        raise EvaluationDataError(
            "the package records no dataset (manifest training.dataset): pass --data file.npz with x and y"
        )
    ds = load_dataset(name)
    return EvalData(name, ds.val[0].numpy(), ds.val[1].numpy(), ds.test[0].numpy(), ds.test[1].numpy())


@torch.inference_mode()
def _forward(model: Any, x: np.ndarray) -> np.ndarray:
    outs = [model(torch.from_numpy(x[i : i + 256])).float() for i in range(0, len(x), 256)]
    return torch.cat(outs).numpy()


def _mc(engine: MCEngine, x: np.ndarray, t: int, seed: int, bar: Any) -> np.ndarray:
    """Per-sample raw outputs [T, N, K] (logits or standardised values), rows in chunks, seeded per chunk."""
    parts = []
    for i in range(0, len(x), _CHUNK):
        result = engine(torch.from_numpy(x[i : i + _CHUNK]), samples=t, seed=seed + i, return_samples=True)
        raw = result.sample_logits if result.sample_logits is not None else result.samples
        assert raw is not None, "the engine was asked for its per-sample outputs"
        parts.append(raw.float().numpy())
        bar.update(min(_CHUNK, len(x) - i))
    return np.concatenate(parts, axis=1)


def _scores(sample_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Uncertainty scores of MC per-sample logits (larger = more uncertain)."""
    s = classification_summaries(torch.from_numpy(sample_logits))
    return {
        "max_probability": 1.0 - s.probabilities.max(dim=1).values.numpy(),
        "predictive_entropy": s.predictive_entropy.numpy(),
        "mutual_information": s.mutual_information.numpy(),
        "variation_ratio": s.variation_ratio.numpy(),
    }


def _det_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    p = softmax(logits, axis=1)
    logp = log_softmax(logits, axis=1)
    return {"max_probability": 1.0 - p.max(axis=1), "predictive_entropy": -(p * logp).sum(axis=1)}


def _predictions(sample_logits: np.ndarray, det_logits: np.ndarray) -> dict[str, Any]:
    """What the network answers on a set: its most frequent MC class, that class's share, mean confidences."""
    probs = classification_summaries(torch.from_numpy(sample_logits)).probabilities.numpy()
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    top = int(counts.argmax())
    return {
        "top_class": top,
        "top_class_share": float(counts[top] / len(probs)),
        "mc_mean_max_probability": float(probs.max(axis=1).mean()),
        "deterministic_mean_max_probability": float(softmax(det_logits, axis=1).max(axis=1).mean()),
    }


def _classification_block(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return {
        "accuracy": m.accuracy(probs, y),
        "nll": m.nll(probs, y),
        "brier": m.brier(probs, y),
        "ece": m.ece(probs, y),
        "reliability": m.reliability(probs, y),
    }


def _evaluate_classification(
    model: Any,
    mc_model: Any,
    data: EvalData,
    ts: tuple[int, ...],
    seed: int,
    extra_ood: np.ndarray | None,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    t_max = max(ts)
    example = torch.from_numpy(data.x_test[:2])
    engine = MCEngine(mc_model, example, task="classification")
    ood_test = ood_sets(data.dataset, data.x_test, "test", seed, extra_ood)
    ood_val = ood_sets(data.dataset, data.x_val, "val", seed + 1, extra_ood)
    rows = len(data.x_val) + len(data.x_test) + sum(map(len, ood_test.values())) + sum(map(len, ood_val.values()))
    with tqdm(total=rows, desc=f"MC T={t_max}", unit="row", disable=not progress, leave=False) as bar:
        z_val, z_test = _mc(engine, data.x_val, t_max, seed, bar), _mc(engine, data.x_test, t_max, seed + 10**6, bar)
        z_ood = {k: _mc(engine, v, t_max, seed + 2 * 10**6, bar) for k, v in ood_test.items()}
        z_ood_val = {k: _mc(engine, v, t_max, seed + 3 * 10**6, bar) for k, v in ood_val.items()}
    det_val, det_test = _forward(model, data.x_val), _forward(model, data.x_test)
    det_ood = {k: _forward(model, v) for k, v in ood_test.items()}
    y_val, y_test = data.y_val.astype(np.int64), data.y_test.astype(np.int64)

    report: dict[str, Any] = {"deterministic": _classification_block(softmax(det_test, axis=1), y_test), "mc": {}}
    for t in ts:
        probs = classification_summaries(torch.from_numpy(z_test[:t])).probabilities.numpy()
        report["mc"][str(t)] = _classification_block(probs, y_test)

    # temperature scaling, fitted on validation, reported on test
    tc = min(CALIBRATION_T, t_max)
    tau_det = m.fit_temperature(lambda tau: m.tempered_softmax(det_val, tau), y_val)
    mean_val = np.exp(m.tempered_mc_logits(z_val[:tc], 1.0))
    tau_logits = m.fit_temperature(lambda tau: m.tempered_mc_logits(z_val[:tc], tau), y_val)
    tau_mean = m.fit_temperature(lambda tau: m.tempered_mc_mean(mean_val, tau), y_val)
    mean_test = np.exp(m.tempered_mc_logits(z_test[:tc], 1.0))
    val_nll = {
        "per_sample_logits": m.nll(np.exp(m.tempered_mc_logits(z_val[:tc], tau_logits)), y_val),
        "log_mean": m.nll(np.exp(m.tempered_mc_mean(mean_val, tau_mean)), y_val),
    }
    method = min(val_nll, key=lambda k: val_nll[k])
    after = {
        "deterministic": np.exp(m.tempered_softmax(det_test, tau_det)),
        "mc_per_sample_logits": np.exp(m.tempered_mc_logits(z_test[:tc], tau_logits)),
        "mc_log_mean": np.exp(m.tempered_mc_mean(mean_test, tau_mean)),
    }
    calibration = {
        "num_samples": tc,
        "deterministic": {"temperature": tau_det},
        "mc": {
            "temperature": tau_logits if method == "per_sample_logits" else tau_mean,
            "method": method,
            "candidates": {
                "per_sample_logits": {"temperature": tau_logits, "val_nll": val_nll["per_sample_logits"]},
                "log_mean": {"temperature": tau_mean, "val_nll": val_nll["log_mean"]},
            },
        },
        "before": {
            "deterministic": {k: report["deterministic"][k] for k in ("nll", "ece", "brier", "accuracy")},
            "mc": {k: report["mc"][str(tc)][k] for k in ("nll", "ece", "brier", "accuracy")}
            if str(tc) in report["mc"]
            else {},
        },
        "after": {
            name: {"nll": m.nll(p, y_test), "ece": m.ece(p, y_test), "brier": m.brier(p, y_test)}
            for name, p in after.items()
        },
        "reliability_after": {name: m.reliability(p, y_test) for name, p in after.items()},
    }
    report["calibration"] = calibration

    # OOD detection per set, score and T; deterministic baselines
    in_scores = {t: _scores(z_test[:t]) for t in ts}
    ood: dict[str, Any] = {}
    det_in = _det_scores(det_test)
    for name in ood_test:
        entry: dict[str, Any] = {"rows": len(ood_test[name]), "deterministic": {}, "mc": {}}
        det_out = _det_scores(det_ood[name])
        for score in det_in:
            entry["deterministic"][score] = m.ood_scores(det_in[score], det_out[score])
        for t in ts:
            out_scores = _scores(z_ood[name][:t])
            entry["mc"][str(t)] = {s: m.ood_scores(in_scores[t][s], out_scores[s]) for s in SCORES}
        entry["predictions"] = _predictions(z_ood[name][: min(CALIBRATION_T, t_max)], det_ood[name])
        ood[name] = entry
    report["ood"] = ood

    # convergence of each score with T: mean |s_T - s_Tmax| / mean |s_Tmax| on the test inputs
    ref = in_scores[t_max]
    report["convergence"] = {
        s: {
            str(t): float(np.abs(in_scores[t][s] - ref[s]).mean() / max(float(np.abs(ref[s]).mean()), 1e-12))
            for t in ts
        }
        for s in SCORES
    }

    # risk-coverage at the calibration T, MC scores and the deterministic max probability
    correct_mc = classification_summaries(torch.from_numpy(z_test[:tc])).probabilities.numpy().argmax(1) == y_test
    correct_det = det_test.argmax(1) == y_test
    report["risk_coverage"] = {
        "num_samples": tc,
        "mc": {
            s: m.risk_coverage(in_scores[tc][s] if tc in in_scores else _scores(z_test[:tc])[s], correct_mc)
            for s in SCORES
        },
        "deterministic_max_probability": m.risk_coverage(det_in["max_probability"], correct_det),
    }

    # abstention: best OOD score on validation, threshold keeping 95% of in-distribution validation inputs.
    # The scores are those the service answers: max probability of the calibrated MC mean (the runtimes
    # apply the log-of-the-mean temperature), the other scores from the raw passes.
    def served(z: np.ndarray) -> dict[str, np.ndarray]:
        scores = _scores(z)
        p_bar = classification_summaries(torch.from_numpy(z)).probabilities.numpy()
        scores["max_probability"] = 1.0 - calibrate_mean(p_bar, tau_mean).max(axis=1)
        return scores

    val_in, test_in = served(z_val[:tc]), served(z_test[:tc])
    val_auroc = {
        s: float(np.mean([m.ood_scores(val_in[s], served(z[:tc])[s])["auroc"] for z in z_ood_val.values()]))
        for s in SCORES
    }
    best = max(val_auroc, key=lambda s: val_auroc[s])
    threshold = float(np.quantile(val_in[best], KEEP_TARGET))
    report["abstention"] = {
        "score": best,
        "threshold": threshold,
        "num_samples": tc,
        "target_keep": KEEP_TARGET,
        "validation_auroc": val_auroc,
        "test_kept": float((test_in[best] <= threshold).mean()),
        "test_ood_abstained": {name: float((served(z_ood[name][:tc])[best] > threshold).mean()) for name in z_ood},
    }
    report["summary"] = _classification_summary(report, tc)
    return report


def _classification_summary(report: dict[str, Any], tc: int) -> dict[str, Any]:
    det = report["deterministic"]
    mc = report["mc"].get(str(tc), {})
    best_ood = {
        name: max(
            ((f"mc:{s}", v["auroc"]) for s, v in entry["mc"].get(str(tc), {}).items()),
            key=lambda kv: kv[1],
            default=("none", float("nan")),
        )
        for name, entry in report["ood"].items()
    }
    return {
        "task": "classification",
        "num_samples": tc,
        "deterministic": {k: round(det[k], 4) for k in ("accuracy", "nll", "brier", "ece")},
        "mc": {k: round(mc[k], 4) for k in ("accuracy", "nll", "brier", "ece")} if mc else {},
        "calibrated": {
            k: {"nll": round(v["nll"], 4), "ece": round(v["ece"], 4)} for k, v in report["calibration"]["after"].items()
        },
        "ood_auroc": {name: {"best": best, "auroc": round(auroc, 4)} for name, (best, auroc) in best_ood.items()},
        "mutual_information_deviation_at_t": {
            t: round(v, 4) for t, v in report["convergence"]["mutual_information"].items()
        },
        "abstention": {k: report["abstention"][k] for k in ("score", "threshold", "num_samples", "target_keep")},
        "aurc": round(report["risk_coverage"]["mc"]["predictive_entropy"]["aurc"], 4),
    }


def _evaluate_regression(
    model: Any,
    mc_model: Any,
    data: EvalData,
    ts: tuple[int, ...],
    seed: int,
    manifest: Any,
    extra_ood: np.ndarray | None,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    t_max = max(ts)
    scale = float(manifest.target.std) if manifest.target is not None else 1.0
    engine = MCEngine(mc_model, torch.from_numpy(data.x_test[:2]), task="regression")
    ood_test = regression_ood_sets(np.concatenate([data.x_val, data.x_test]), data.x_test, seed, extra_ood)
    rows = len(data.x_val) + len(data.x_test) + sum(map(len, ood_test.values()))
    with tqdm(total=rows, desc=f"MC T={t_max}", unit="row", disable=not progress, leave=False) as bar:
        s_val, s_test = _mc(engine, data.x_val, t_max, seed, bar), _mc(engine, data.x_test, t_max, seed + 10**6, bar)
        s_ood = {k: _mc(engine, v, t_max, seed + 2 * 10**6, bar) for k, v in ood_test.items()}
    y_val = data.y_val.reshape(len(data.y_val), -1).astype(np.float64)
    y_test = data.y_test.reshape(len(data.y_test), -1).astype(np.float64)
    det_val, det_test = _forward(model, data.x_val), _forward(model, data.x_test)
    noise_det = float(((y_val - det_val) ** 2).mean())

    def block(mean: np.ndarray, var: np.ndarray) -> dict[str, Any]:
        std = np.sqrt(var)
        return {
            "rmse": float(np.sqrt(((mean - y_test) ** 2).mean())) * scale,
            "nll": m.gaussian_nll(mean * scale, var * scale**2, y_test * scale),
            "coverage": {str(lv): m.gaussian_interval_coverage(mean, std, y_test, lv) for lv in (0.5, 0.9, 0.95)},
            "mean_predictive_std": float(std.mean()) * scale,
        }

    report: dict[str, Any] = {"deterministic": block(det_test, np.full_like(det_test, noise_det)), "mc": {}}
    report["deterministic"]["noise_variance"] = noise_det * scale**2
    for t in ts:
        mean_v, var_v = s_val[:t].mean(0), s_val[:t].var(0)
        noise = max(float(((y_val - mean_v) ** 2 - var_v).mean()), 1e-6)
        mean_t, var_t = s_test[:t].mean(0), s_test[:t].var(0)
        report["mc"][str(t)] = block(mean_t, var_t + noise) | {"noise_variance": noise * scale**2}
    # OOD: the MC predictive std across the passes (larger = more uncertain), per set and T
    ood: dict[str, Any] = {}
    for name, samples in s_ood.items():
        ood[name] = {
            "rows": int(samples.shape[1]),
            "mc": {str(t): {"std": m.ood_scores(_mc_std(s_test[:t]), _mc_std(samples[:t]))} for t in ts},
        }
    report["ood"] = ood
    report["ood_definition"] = REGRESSION_OOD_DEFINITION
    tc = min(CALIBRATION_T, t_max)
    report["summary"] = {
        "task": "regression",
        "num_samples": tc,
        "deterministic": {k: round(report["deterministic"][k], 4) for k in ("rmse", "nll")},
        "mc": {k: round(report["mc"][str(tc)][k], 4) for k in ("rmse", "nll")} if str(tc) in report["mc"] else {},
        "mc_coverage": report["mc"].get(str(tc), {}).get("coverage", {}),
        "ood_auroc": {
            name: {"best": "mc:std", "auroc": round(entry["mc"][str(tc)]["std"]["auroc"], 4)}
            for name, entry in ood.items()
            if str(tc) in entry["mc"]
        },
    }
    return report


def _mc_std(samples: np.ndarray) -> np.ndarray:
    """Per-input MC standard deviation ``[N]`` of ``[T, N, outputs]`` samples (averaged over outputs)."""
    return samples.std(axis=0).reshape(samples.shape[1], -1).mean(axis=1)


def evaluate_package(
    package: str | Path,
    *,
    data: str | Path | None = None,
    ood: str | Path | None = None,
    num_samples: Iterable[int] = DEFAULT_T,
    seed: int = 0,
    allow_modules: Iterable[str] | None = None,
    progress: bool = True,
    plots: bool = True,
    max_rows: int | None = None,
) -> Evaluation:
    """Evaluate a package (see the module docstring); nothing is written (see `write_evaluation`)."""
    ts = tuple(sorted({int(t) for t in num_samples}))
    if not ts or ts[0] < 2:
        raise EvaluationDataError(f"num_samples must be integers >= 2, got {list(ts)}")
    if max_rows is not None and max_rows < 10:
        raise EvaluationDataError(f"max_rows must be at least 10, got {max_rows}")
    wall, cpu = time.perf_counter(), time.process_time()
    model, mc_model, manifest = _load(package, allow_modules)
    evaluation_data = _data(manifest, data, max_rows)
    extra = load_npz(ood, need_y=False)[0] if ood is not None else None
    if extra is not None:
        if extra.shape[1:] != evaluation_data.x_test.shape[1:] or len(extra) < 2:
            raise EvaluationDataError(
                f"{ood}: x has shape {list(extra.shape)}, the package's inputs are "
                f"[N, {', '.join(map(str, evaluation_data.x_test.shape[1:]))}] (at least 2 rows)"
            )
        if extra.dtype.kind not in "biuf":
            raise EvaluationDataError(f"{ood}: x must be numbers, got dtype {extra.dtype}")
        extra = extra[:max_rows] if max_rows is not None else extra
    if manifest.task == "classification":
        report = _evaluate_classification(model, mc_model, evaluation_data, ts, seed, extra, progress)
    else:
        report = _evaluate_regression(model, mc_model, evaluation_data, ts, seed, manifest, extra, progress)
    report = {
        "model": manifest.name,
        "version": manifest.version,
        "dataset": evaluation_data.dataset if data is None else str(data),
        "rows": {"validation": len(evaluation_data.x_val), "test": len(evaluation_data.x_test)},
        "num_samples": list(ts),
        "seed": seed,
        **report,
        # the whole evaluation before plotting: loading, every forward pass, the metrics (this process)
        "seconds": {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu},
    }
    result = Evaluation(report)
    if plots:
        from .evaluate_plots import render_plots

        result.plots = render_plots(report)
    return result


def write_evaluation(package_dir: str | Path, evaluation: Evaluation) -> list[str]:
    """Store ``evaluation.json`` and the plots in the package and the summary in the manifest; file names."""
    from dropwise.package import add_file, update_manifest

    report = evaluation.report
    text = json.dumps(report, indent=2, allow_nan=True, default=_json_default)
    names = ["evaluation.json"]
    add_file(package_dir, "evaluation.json", text.encode())
    for name, png in evaluation.plots.items():
        add_file(package_dir, name, png)
        names.append(name)
    fields: dict[str, Any] = {"evaluation": _finite(report["summary"]) | {"files": names}}
    if "calibration" in report:
        cal = report["calibration"]
        # the runtimes and the MC graph apply the log-of-the-mean temperature (`dropwise.surgery.calibration`);
        # the better fit by validation NLL is kept beside it as ``best_method``
        log_mean = cal["mc"]["candidates"]["log_mean"]["temperature"]
        fields["calibration"] = {
            "deterministic": cal["deterministic"],
            "mc": {"temperature": log_mean, "method": "log_mean", "best_method": cal["mc"]["method"]},
            "num_samples": cal["num_samples"],
            "applied": True,
        }
    if "abstention" in report:
        fields["abstention"] = {
            k: report["abstention"][k] for k in ("score", "threshold", "num_samples", "target_keep")
        }
    update_manifest(package_dir, **fields)
    if "calibration" in fields:
        from .calibration import bake_temperatures

        cal = fields["calibration"]
        names += bake_temperatures(package_dir, cal["deterministic"]["temperature"], cal["mc"]["temperature"])
    return names


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN / inf replaced by None (manifests are strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
