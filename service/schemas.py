"""Pydantic models of the native API (`/v1/...`), with the examples shown in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

# one standardised 8x8 digit (a "1" of the digits test split), as GET /v1/models/mlp_digits describes
_DIGIT = [
    -0.81, -0.81, -0.81, 1.18, 1.35, 0.02, -0.81, -0.81, -0.81, -0.81, -0.81, 1.02, 1.85, 0.68, -0.81, -0.81,
    -0.81, -0.81, -0.31, 1.68, 1.85, 0.19, -0.81, -0.81, -0.81, 0.35, 1.68, 1.85, 1.85, -0.48, -0.81, -0.81,
    -0.81, -0.81, -0.65, 1.85, 1.85, -0.31, -0.81, -0.81, -0.81, -0.81, -0.65, 1.85, 1.85, 0.19, -0.81, -0.81,
    -0.81, -0.81, -0.65, 1.85, 1.85, 0.19, -0.81, -0.81, -0.81, -0.81, -0.81, 1.02, 1.85, 0.85, -0.81, -0.81,
]  # fmt: skip

PREDICT_EXAMPLES: dict[str, dict[str, Any]] = {
    "deterministic": {
        "summary": "Deterministic prediction (dropout off)",
        "value": {"inputs": [_DIGIT], "mode": "deterministic"},
    },
    "mc": {
        "summary": "MC-dropout prediction with uncertainty, T=32, fixed seed",
        "value": {"inputs": [_DIGIT], "mode": "mc", "num_samples": 32, "seed": 7},
    },
    "mc_with_samples": {
        "summary": "MC-dropout returning every per-sample probability vector",
        "value": {"inputs": [_DIGIT], "mode": "mc", "num_samples": 8, "seed": 7, "return_samples": True},
    },
}


class PredictRequest(BaseModel):
    """A batch of examples and how to predict them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [PREDICT_EXAMPLES["mc"]["value"]]})

    inputs: Any = Field(
        ...,
        description=(
            "Batch of examples: nested lists shaped like the input of GET /v1/models/{name}; for a model with "
            'several named inputs an object of them, e.g. {"input_ids": [[...]], "attention_mask": [[...]]}.'
        ),
        json_schema_extra={"anyOf": [{"type": "array"}, {"type": "object"}]},
    )

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, inputs: Any) -> Any:
        """A non-empty list, or an object of non-empty lists (shapes and dtypes are the service's check)."""
        arrays = inputs.values() if isinstance(inputs, dict) else [inputs]
        if not isinstance(inputs, list | dict) or not inputs:
            raise ValueError("inputs must be a non-empty array, or an object of named arrays")
        if not all(isinstance(a, list) and a for a in arrays):
            raise ValueError("each named input must be a non-empty array")
        return inputs

    mode: Literal["deterministic", "mc"] = Field(
        "deterministic", description="`deterministic`: dropout off; `mc`: Monte-Carlo dropout with T samples."
    )
    num_samples: StrictInt | None = Field(None, description="MC sample count T (default: the server's default T).")
    samples: StrictInt | None = Field(
        None,
        description="Deprecated alias of `num_samples` (give one of the two).",
        json_schema_extra={"deprecated": True},
    )
    seed: StrictInt | None = Field(
        None, description="Seed of the dropout masks; the same request and seed give the same answer."
    )
    return_samples: StrictBool = Field(
        False, description="MC only: also return `samples`, the per-sample probabilities (or values)."
    )
    preprocess: StrictBool = Field(
        False,
        description="`inputs` are raw (e.g. pixels 0..16 for the digits models): apply the package's recorded "
        "preprocessing (`input.preprocessing` of GET /v1/models/{name}) first.",
    )
    timeout_s: float | None = Field(None, ge=0.001, le=3600, description="Deadline in seconds (504 past it).")
    abstain: Literal["auto"] | StrictInt | StrictFloat | None = Field(
        None,
        description="MC classification: also answer `abstain` per row. `auto`: the rule `dropwise evaluate` "
        "stored (best OOD score on validation, threshold keeping 95% of in-distribution inputs); a number: "
        "that threshold on the stored score (predictive entropy when none is stored).",
    )


class Uncertainty(BaseModel):
    """MC-dropout summaries (Gal & Ghahramani 2016; BALD mutual information, Houlsby et al. 2011)."""

    predictive_entropy: list[float] | None = Field(None, description="Total uncertainty H[p_bar] (nats).")
    expected_entropy: list[float] | None = Field(None, description="Aleatoric part mean_t H[p_t] (nats).")
    mutual_information: list[float] | None = Field(None, description="Epistemic part H - E (>= 0).")
    variation_ratio: list[float] | None = Field(None, description="1 - (votes of the modal class) / T.")
    std: list[list[float]] = Field(..., description="Per-class (or per-output) standard deviation over T.")


class PredictResponse(BaseModel):
    """Predictions of one request."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mlp_digits",
                    "version": 1,
                    "mode": "mc",
                    "predictions": ["1"],
                    "probabilities": [[0.01, 0.9, 0.02, 0.0, 0.0, 0.03, 0.0, 0.01, 0.02, 0.01]],
                    "uncertainty": {
                        "predictive_entropy": [0.45],
                        "expected_entropy": [0.3],
                        "mutual_information": [0.15],
                        "variation_ratio": [0.06],
                        "std": [[0.01, 0.08, 0.02, 0.0, 0.0, 0.03, 0.0, 0.01, 0.02, 0.01]],
                    },
                    "num_samples": 32,
                    "seed": 7,
                    "backend": "torch",
                    "device": "cpu",
                    "provider": "torch-cpu",
                }
            ]
        }
    )

    model: str
    version: int
    mode: Literal["deterministic", "mc"]
    predictions: list[str] | list[int] | None = Field(
        None, description="Classification: the predicted label of each example."
    )
    probabilities: list[list[float]] | None = Field(
        None, description="Classification: class probabilities (MC: mean over the T samples)."
    )
    mean: list[list[float]] | None = Field(None, description="Regression: predicted value (MC: mean over T).")
    uncertainty: Uncertainty | None = Field(None, description="MC only.")
    abstain: list[bool] | None = Field(None, description="With `abstain` in the request: true = do not trust this row.")
    samples: list[list[list[float]]] | None = Field(
        None,
        description="MC with return_samples: per-sample probabilities softmax(z_t) (regression: values), "
        "shape [T, batch, K] (renamed from `sample_outputs`).",
    )
    num_samples: int | None = Field(None, description="MC: the T used (renamed from `samples`).")
    seed: int | None = Field(None, description="MC: the seed used (drawn by the server when not given).")
    backend: str
    device: str
    provider: str
    timings: dict[str, float] = Field(default_factory=dict, description="queue_ms, compute_ms, total_ms.")


class InputSpecOut(BaseModel):
    """The input a model expects: shape with -1 for the batch dimension."""

    name: str
    shape: list[int]
    dtype: str
    preprocessing: str
    range: list[int] | None = Field(None, description="[low, high) of an integer input (token ids, masks).")


class ModelSummary(BaseModel):
    """One entry of `GET /v1/models`."""

    name: str
    version: int
    versions: list[int]
    task: str
    ready: bool
    backend: str
    device: str


class ModelList(BaseModel):
    """Every model the service holds."""

    models: list[ModelSummary]


class ModelDetail(BaseModel):
    """`GET /v1/models/{name}`: everything a client needs to call the model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "mlp_digits",
                    "version": 1,
                    "versions": [1],
                    "task": "classification",
                    "input": {
                        "name": "input",
                        "shape": [-1, 64],
                        "dtype": "float32",
                        "preprocessing": "standardised pixels",
                    },
                    "labels": [str(i) for i in range(10)],
                    "sites": [{"path": "2", "kind": "dropout", "p": 0.5}],
                    "backend": "torch",
                    "device": "cpu",
                    "provider": "torch-cpu",
                    "ready": True,
                    "mc_available": True,
                    "max_samples": 256,
                    "default_samples": 32,
                }
            ]
        }
    )

    name: str
    version: int
    versions: list[int]
    task: str
    input: InputSpecOut = Field(..., description="The first input (the only one for most models).")
    inputs: list[InputSpecOut] = Field(..., description="Every named input, in the order the model takes them.")
    labels: list[str] | None
    sites: list[dict[str, Any]]
    backend: str
    device: str
    provider: str
    ready: bool
    mc_available: bool
    max_samples: int
    default_samples: int
    placement: dict[str, Any] | None = Field(
        None,
        description="ONNX Runtime on CUDA: the MC graph's nodes the CUDA provider has no kernel for (static count).",
    )
    evaluation: dict[str, Any] | None = Field(
        None,
        description="Summary of `dropwise evaluate` (test split): deterministic vs MC accuracy / NLL / Brier / ECE, "
        "after temperature scaling, the best OOD score per OOD set with its AUROC, MI deviation by T, the "
        "abstention rule; the full report is the package's evaluation.json.",
    )
    calibrated: bool = Field(
        False,
        description="Classification `probabilities` are temperature-scaled with the temperatures `dropwise evaluate` "
        "stored (deterministic: softmax(z / T); MC: softmax(log p_bar / T)); uncertainty scores are not.",
    )


class ErrorDetail(BaseModel):
    """What went wrong, and which request field caused it."""

    message: str
    field: str | None = None
    type: str


class ErrorBody(BaseModel):
    """Every native error answers this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "samples must be between 1 and 256, got 1000",
                        "field": "samples",
                        "type": "InvalidInput",
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class Health(BaseModel):
    """`/healthz` and `/readyz` answer."""

    status: Literal["ok", "ready", "not ready"]
    models: dict[str, bool] = Field(default_factory=dict, description="Model name -> loaded (readyz only).")
    errors: dict[str, str] = Field(default_factory=dict, description="Packages that failed to load.")
    waiting_for: str | None = Field(
        None, description="readyz when not ready: what the service waits for (training, a model loading, ...)."
    )
