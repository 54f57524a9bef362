"""The output contract: one table of every output name, its dtype, its shape and its meaning.

Every place that names a prediction output reads it from here: the MC summaries
(`dropwise.surgery.summaries`), the MC ONNX graph (`dropwise.surgery.mc_export`), the service's runtimes and
encoders (`dropwise.service.runtimes.base`), the output lists of `dropwise.service.inference.ModelInfo`
and the V2 model metadata (`dropwise.service.routes.v2`).

One spelling per quantity:

* ``probabilities`` [B, K]: class probabilities. Deterministic: softmax of the eval-mode logits; MC: the
  MC-dropout predictive mean ``p_bar = mean_t softmax(z_t)`` (Gal & Ghahramani 2016). Formerly
  ``mean_probs`` in the Python results and the MC ONNX graph (`LEGACY_NAMES`).
* ``samples`` [T, B, K]: the T per-sample outputs a user sees: per-sample PROBABILITIES ``softmax(z_t)``
  for classification, per-sample values for regression. Formerly ``sample_outputs`` (native API, MC graph).
* ``sample_logits`` [T, B, K]: classification per-sample logits ``z_t`` (Python results and the MC ONNX
  graphs; the service answers probabilities only).
* ``num_samples``: the count T. The HTTP APIs still accept the request field / parameter ``samples`` as a
  deprecated alias of ``num_samples``.

Shapes use symbolic dimensions: ``B`` rows of the request, ``K`` classes, ``D`` regression outputs, ``T``
MC samples. Regression values are in target units in the service (the package records the
standardisation) and standardised in the graphs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ABSTAIN",
    "LEGACY_NAMES",
    "NUM_SAMPLES",
    "OUTPUTS",
    "SAMPLES",
    "SAMPLE_LOGITS",
    "SEED_USED",
    "OutputSpec",
    "mc_graph_output_names",
    "output_names",
    "output_shape",
    "rename_legacy",
    "summary_names",
]

Task = str  # "classification" | "regression"
Mode = str  # "deterministic" | "mc"

NUM_SAMPLES = "num_samples"
"""The name of the MC sample count T in requests and responses."""
SAMPLES = "samples"
"""Per-sample outputs ``[T, B, K]``: probabilities (classification) or values (regression)."""
SAMPLE_LOGITS = "sample_logits"
"""Per-sample logits ``[T, B, K]`` (classification: Python results and MC graphs, never a service output)."""
ABSTAIN = "abstain"
"""Per-row abstention flags ``[B]``, answered when a request asks for them (``abstain``)."""
SEED_USED = "seed_used"
"""The MC ONNX graph's last output: the seed its masks were drawn from (int64 scalar)."""


@dataclass(frozen=True)
class OutputSpec:
    """One output: name, numpy dtype, symbolic shape, the tasks and modes that answer it, its meaning.

    ``summary`` marks the MC summaries computed by `dropwise.surgery.summaries` (and in the MC graph);
    ``per_sample`` marks the ``samples`` output, present only when a request asks for it.
    """

    name: str
    dtype: str
    shape: tuple[str, ...]
    tasks: tuple[Task, ...]
    modes: tuple[Mode, ...]
    description: str
    summary: bool = False
    per_sample: bool = False
    on_request: bool = False


_C = ("classification",)
_R = ("regression",)
_BOTH = ("classification", "regression")
_DET_MC = ("deterministic", "mc")
_MC = ("mc",)

OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec(
        "probabilities",
        "float32",
        ("B", "K"),
        _C,
        _DET_MC,
        "class probabilities (MC: the predictive mean over the T samples)",
        summary=True,
    ),
    OutputSpec("predictions", "int64", ("B",), _C, _DET_MC, "index of the most probable class"),
    OutputSpec("mean", "float32", ("B", "D"), _R, _DET_MC, "predicted value (MC: mean over T)", summary=True),
    OutputSpec("predictive_entropy", "float32", ("B",), _C, _MC, "H[p_bar], total uncertainty (nats)", summary=True),
    OutputSpec("expected_entropy", "float32", ("B",), _C, _MC, "mean_t H[p_t], aleatoric part (nats)", summary=True),
    OutputSpec(
        "mutual_information",
        "float32",
        ("B",),
        _C,
        _MC,
        "H[p_bar] - mean_t H[p_t], epistemic part (BALD, Houlsby et al. 2011), >= 0",
        summary=True,
    ),
    OutputSpec("variation_ratio", "float32", ("B",), _C, _MC, "1 - votes of the modal class / T", summary=True),
    OutputSpec(
        "std",
        "float32",
        ("B", "K|D"),
        _BOTH,
        _MC,
        "per-class probability (or per-output value) standard deviation over T (divisor T)",
        summary=True,
    ),
    OutputSpec(
        SAMPLES,
        "float32",
        ("T", "B", "K|D"),
        _BOTH,
        _MC,
        "per-sample outputs: probabilities softmax(z_t) (classification) or values (regression)",
        per_sample=True,
    ),
    OutputSpec(
        ABSTAIN,
        "bool",
        ("B",),
        _C,
        _MC,
        "true where the request's abstention rule says not to trust the prediction (score above threshold)",
        on_request=True,
    ),
)
"""Every output, in the order responses and metadata list them."""

_BY_NAME: dict[str, OutputSpec] = {spec.name: spec for spec in OUTPUTS}

LEGACY_NAMES: Mapping[str, str] = {"mean_probs": "probabilities", "sample_outputs": SAMPLES}
"""Names used before the contract (MC graphs exported earlier still carry them) -> current names.

A legacy MC graph's ``sample_outputs`` are per-sample LOGITS for classification; `rename_legacy` reports
them as ``sample_logits``.
"""


def spec(name: str) -> OutputSpec:
    """The `OutputSpec` of ``name``; raises `KeyError` for an unknown output."""
    return _BY_NAME[name]


def output_names(task: Task, mode: Mode, return_samples: bool = False, abstain: bool = False) -> list[str]:
    """Output names a service answer holds for ``task`` and ``mode``, in table order.

    ``samples`` only in MC mode and only when ``return_samples``; ``abstain`` only when asked for.
    """
    return [
        s.name
        for s in OUTPUTS
        if task in s.tasks
        and mode in s.modes
        and (not s.per_sample or (mode == "mc" and return_samples))
        and (not s.on_request or abstain)
    ]


def summary_names(task: Task) -> tuple[str, ...]:
    """The MC summaries of ``task``, in table order (what `dropwise.surgery.summaries` computes)."""
    return tuple(s.name for s in OUTPUTS if s.summary and task in s.tasks)


def mc_graph_output_names(task: Task, return_samples: bool) -> list[str]:
    """Outputs of an MC ONNX graph, in order: the summaries, then when asked ``samples`` (and for
    classification ``sample_logits``), then ``seed_used``."""
    names = list(summary_names(task))
    if return_samples:
        names.append(SAMPLES)
        if task == "classification":
            names.append(SAMPLE_LOGITS)
    names.append(SEED_USED)
    return names


def output_shape(name: str, task: Task, width: int | None = None) -> list[int]:
    """Concrete shape of output ``name`` with -1 for dynamic dimensions (B, T, and K/D when unknown)."""
    size = width if width is not None and width > 0 else -1
    dims = {"B": -1, "T": -1, "K": size, "D": size, "K|D": size}
    return [dims[d] for d in spec(name).shape]


def rename_legacy(values: Mapping[str, object], task: Task) -> dict[str, object]:
    """Outputs of an MC graph by their current names (graphs exported before the contract used others)."""
    out: dict[str, object] = {}
    for key, value in values.items():
        if key == "sample_outputs" and task == "classification":
            out[SAMPLE_LOGITS] = value
        else:
            out[LEGACY_NAMES.get(key, key)] = value
    return out
