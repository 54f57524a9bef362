"""The KServe manifests in deploy/: valid YAML that names what exists (settings, routes, runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dropwise.service.app import create_app
from dropwise.service.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kserve"


def _load(name: str) -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert len(documents) == 1 and isinstance(documents[0], dict), name
    return documents[0]


def _env_names(env: list[dict[str, Any]]) -> set[str]:
    for entry in env:
        assert set(entry) in ({"name", "value"}, {"name", "valueFrom"}), entry
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['name']}: Kubernetes env values are strings"
    return {entry["name"] for entry in env}


def _known(names: set[str]) -> None:
    fields = {f"DROPWISE_{name.upper()}" for name in Settings.model_fields}
    assert names <= fields, f"unknown settings: {sorted(names - fields)}"


def test_serving_runtime_and_inference_service_fit_together(tmp_path: Path) -> None:
    runtime = _load("servingruntime.yaml")
    service = _load("inferenceservice.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")

    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    _known(_env_names(model.get("env", [])))

    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e.get("value") for e in container["env"]}
    _known(set(env))
    port = int(env["DROPWISE_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    settings = Settings(**{k.removeprefix("DROPWISE_").lower(): v for k, v in env.items() if v is not None})
    assert settings.port == port and settings.host == "0.0.0.0"
    assert container["args"] == ["--repository", "/mnt/models"]  # where KServe's storage initializer puts it

    routes = set(create_app(Settings(repository=tmp_path)).openapi()["paths"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == port
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] in routes
