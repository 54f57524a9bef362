"""A served model version's configuration in the JSON form of Triton's `ModelConfig`.

`GET /v2/models/{m}/config` answers it, so `tritonclient`'s `get_model_config` reads it. It states what the
server actually applies to that version: the global settings with the package's own serving configuration
(`dropwise.package.serving`) laid over them. Triton fields: `max_batch_size`, `dynamic_batching`
(`max_queue_delay_microseconds`, `default_queue_policy.max_queue_size` and
`default_timeout_microseconds`), `version_policy`, `input` / `output` (dims without the batch dimension,
-1 = variable). dropwise's own values travel in `parameters` as Triton's `{"string_value": ...}`:
`default_samples`, `max_samples`, `request_timeout_s`, `mc_available`, `task`, `config_source` (the
fields the package itself set) and `warm_up` (the passes run before the version served, with their times).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dropwise.service.inference import ModelInfo
    from dropwise.service.model_control import LoadedVersion

__all__ = ["triton_model_config"]

_TYPES = {"float32": "TYPE_FP32", "float64": "TYPE_FP64", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def _outputs(info: ModelInfo) -> list[dict[str, Any]]:
    classes = len(info.labels) if info.labels else -1
    per_row = [classes] if info.task == "classification" else [-1]
    dims: dict[str, tuple[str, list[int]]] = {
        "probabilities": ("TYPE_FP32", per_row),
        "predictions": ("TYPE_INT64", [1]),
        "mean": ("TYPE_FP32", per_row),
        "predictive_entropy": ("TYPE_FP32", [1]),
        "expected_entropy": ("TYPE_FP32", [1]),
        "mutual_information": ("TYPE_FP32", [1]),
        "variation_ratio": ("TYPE_FP32", [1]),
        "std": ("TYPE_FP32", per_row),
    }
    names = info.output_names("mc" if info.mc_available else "deterministic")
    out = []
    for name in names:
        data_type, shape = dims[name]
        entry: dict[str, Any] = {"name": name, "data_type": data_type, "dims": shape}
        if shape == [1]:
            entry["reshape"] = {"shape": []}  # one value per row
        out.append(entry)
    return out


def triton_model_config(info: ModelInfo, slot: LoadedVersion) -> dict[str, Any]:
    """Triton's model configuration (JSON) of one served version, with the settings in force."""
    settings = slot.settings
    source = sorted(slot.config.overrides())
    parameters = {
        "task": info.task,
        "version": str(info.version),
        "mc_available": str(info.mc_available).lower(),
        "default_samples": str(info.default_samples),
        "max_samples": str(info.max_samples),
        "request_timeout_s": f"{settings.request_timeout_s:g}",
        "config_source": ",".join(source) if source else "server defaults",
        "warm_up": ",".join(f"{mode}:{seconds * 1000:.1f}ms" for mode, seconds in slot.warm_up_s.items()),
    }
    return {
        "name": info.name,
        "platform": f"dropwise_{info.backend}",
        "backend": "dropwise",
        "version_policy": slot.config.version_policy.to_triton(),
        "max_batch_size": settings.max_batch_size,
        "input": [
            {
                "name": info.input_name,
                "data_type": _TYPES.get(info.input_dtype, "TYPE_FP32"),
                "dims": [int(d) for d in info.input_shape[1:]],
            }
        ],
        "output": _outputs(info),
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            "default_queue_policy": {
                "max_queue_size": settings.queue_capacity,
                "default_timeout_microseconds": int(settings.request_timeout_s * 1e6),
                "timeout_action": "REJECT",
            },
        },
        "instance_group": [{"count": 1, "kind": "KIND_GPU" if info.device.startswith("cuda") else "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
