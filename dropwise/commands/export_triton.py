"""``dropwise export-triton REPOSITORY OUT``: export a dropwise model repository as a Triton model repository.

For every model of a dropwise repository, the versions its version policy chooses
(`dropwise.package.serving`, default latest 1) are written as two Triton models on the ONNX Runtime
backend (`platform: "onnxruntime_onnx"`):

- ``<name>/<version>/model.onnx``: the package's deterministic graph (`model.onnx`, dropout folded, one
  input, logits or the standardised regression value as ``output``), with dynamic batching
  (``max_batch_size`` from the package's serving configuration, else the server default) and, for
  classifiers, ``labels.txt`` as the output's label file;
- ``<name>_mc/<version>/model.onnx``: the package's MC-dropout graph (`model.mc.onnx`), whose inputs are the
  batch, ``num_samples`` (T, an int64 scalar) and ``seed`` (int64 scalar, optional: left out or negative, the
  graph draws a fresh one and reports it in ``seed_used``). Its outputs are the uncertainty summaries
  (`dropwise.surgery.mc_export`). T is a run-time input, so the MC model takes whole requests
  (``max_batch_size: 0``, the batch dimension is declared as -1).

Inputs and outputs in each ``config.pbtxt`` are read from the ONNX graph itself, so the configuration and the
file cannot disagree. Only verified packages are exported (checksums first); a package without its ONNX
graphs is skipped with the reason (``dropwise convert`` writes them and checks their parity with torch).
Nothing is unpickled.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dropwise.errors import UserError

if TYPE_CHECKING:  # the package layer imports torch: loaded when the command runs, not when the CLI starts
    from dropwise.package import Manifest
    from dropwise.package.serving import ServingConfig

__all__ = ["ExportedModel", "TritonExport", "export_triton", "register", "to_pbtxt"]

DETERMINISTIC_FILE = "model.onnx"
MC_FILE = "model.mc.onnx"
#: Triton's default for a model without a serving configuration (the dropwise server's default too).
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_SAMPLES = 32

_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    16: "TYPE_BF16",
}


@dataclass
class ExportedModel:
    """One Triton model written: its name, versions and where its configuration lies."""

    name: str
    source: str
    flavour: str  #: "deterministic" or "mc"
    versions: list[int]
    config_path: Path


@dataclass
class TritonExport:
    """What `export_triton` wrote, and what it skipped with the reason."""

    out: Path
    models: list[ExportedModel] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- text format
class _Enum(str):
    """A protobuf enum value: written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """A message (dict of fields; lists are repeated fields, dicts sub-messages) in protobuf text format.

    `map<string, V>` fields are lists of ``{"key": ..., "value": ...}`` messages, as the text format writes
    them; enum values are `_Enum` strings.
    """
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and all(not isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
            continue
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{")
                lines.append(to_pbtxt(item, indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------- graph I/O
def _graph_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """Inputs (initializer-backed ones included, marked), outputs, and the names with a default value."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    defaults = {init.name for init in proto.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        data_type = _ONNX_TO_TRITON.get(tensor.elem_type)
        if data_type is None:
            raise UserError(f"{path}: tensor {value.name!r} has an element type Triton does not take")
        return {"name": value.name, "data_type": data_type, "dims": dims}

    inputs = [describe(v) for v in proto.graph.input]
    outputs = [describe(v) for v in proto.graph.output]
    return inputs, outputs, defaults


def _tensor_config(tensor: dict[str, Any], *, batched: bool, optional: bool = False) -> dict[str, Any]:
    dims = tensor["dims"][1:] if batched else tensor["dims"]
    entry: dict[str, Any] = {"name": tensor["name"], "data_type": _Enum(tensor["data_type"])}
    if dims:
        entry["dims"] = dims
    else:  # a scalar: Triton carries it as [1] and reshapes it for the model
        entry["dims"] = [1]
        entry["reshape"] = {"shape": []}
    if optional:
        entry["optional"] = True
    return entry


def _parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def _version_policy(config: ServingConfig) -> dict[str, Any]:
    policy = config.version_policy.to_triton()
    if "latest" in policy:
        return {"latest": {"num_versions": policy["latest"]["num_versions"]}}
    if "specific" in policy:
        return {"specific": {"versions": policy["specific"]["versions"]}}
    return {"all": {}}


def deterministic_config(
    name: str, manifest: Manifest, onnx_path: Path, config: ServingConfig, labels: bool
) -> dict[str, Any]:
    """The `config.pbtxt` message of the deterministic model (dynamic batching on)."""
    inputs, outputs, _ = _graph_io(onnx_path)
    max_batch = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    output_entries = [_tensor_config(t, batched=True) for t in outputs]
    if labels:
        output_entries[0]["label_filename"] = "labels.txt"
    message: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": max_batch,
        "version_policy": _version_policy(config),
        "input": [_tensor_config(t, batched=True) for t in inputs],
        "output": output_entries,
        "dynamic_batching": {"max_queue_delay_microseconds": int((config.max_queue_delay_ms or 0.0) * 1000)},
        "parameters": _parameters(
            {"dropwise_task": manifest.task, "dropwise_flavour": "deterministic", "dropwise_source": manifest.name}
        ),
    }
    if config.queue_capacity is not None or config.request_timeout_s is not None:
        policy: dict[str, Any] = {}
        if config.queue_capacity is not None:
            policy["max_queue_size"] = config.queue_capacity
        if config.request_timeout_s is not None:
            policy["default_timeout_microseconds"] = int(config.request_timeout_s * 1e6)
            policy["timeout_action"] = _Enum("REJECT")
        message["dynamic_batching"]["default_queue_policy"] = policy
    return message


def mc_config(name: str, manifest: Manifest, onnx_path: Path, config: ServingConfig) -> dict[str, Any]:
    """The `config.pbtxt` message of the MC model: T and seed declared, whole requests (no batching)."""
    from dropwise.surgery.outputs import NUM_SAMPLES

    inputs, outputs, defaults = _graph_io(onnx_path)
    names = [t["name"] for t in inputs]
    if NUM_SAMPLES not in names or "seed" not in names:
        raise UserError(f"{onnx_path}: an MC graph takes '{NUM_SAMPLES}' and 'seed' inputs, found {names}")
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 0,
        "version_policy": _version_policy(config),
        "input": [_tensor_config(t, batched=False, optional=t["name"] in defaults) for t in inputs],
        "output": [_tensor_config(t, batched=False) for t in outputs],
        "parameters": _parameters(
            {
                "dropwise_task": manifest.task,
                "dropwise_flavour": "mc",
                "dropwise_source": manifest.name,
                "dropwise_default_samples": str(config.default_samples or DEFAULT_SAMPLES),
                "dropwise_seed": "optional int64 scalar; omitted or < 0 draws a fresh seed, reported in seed_used",
            }
        ),
    }


# ---------------------------------------------------------------------------------------- export
def _chosen_versions(model_dir: Path) -> tuple[dict[int, Manifest], dict[str, str]]:
    from dropwise.package import PackageError, list_versions, verify_package
    from dropwise.package.serving import serving_config

    valid: dict[int, Manifest] = {}
    refused: dict[str, str] = {}
    for version in list_versions(model_dir):
        try:
            manifest = verify_package(model_dir / str(version))
            serving_config(manifest)
        except PackageError as exc:
            refused[f"{model_dir.name}/{version}"] = str(exc)
            continue
        valid[version] = manifest
    if not valid:
        return {}, refused
    policy = serving_config(valid[max(valid)]).version_policy
    return {v: valid[v] for v in policy.select(list(valid))}, refused


def export_triton(repository: str | Path, out: str | Path) -> TritonExport:
    """Write the Triton model repository of `repository` into `out` (which must not exist or be empty).

    Raises:
        UserError: `repository` holds no package, `out` is not empty, or no model could be exported.
    """
    from dropwise.package import list_models

    repository, out = Path(repository), Path(out)
    names = list_models(repository)
    if not names:
        raise UserError(f"no model packages in {repository} (expected <repository>/<model>/<version>/)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    result = TritonExport(out=out)
    try:
        for name in names:
            chosen, refused = _chosen_versions(repository / name)
            result.skipped.update(refused)
            if chosen:
                _export_model(repository / name, name, chosen, staging, result)
        if not result.models:
            raise UserError(
                "no model could be exported: " + "; ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items()))
            )
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for model in result.models:
        model.config_path = out / model.config_path.relative_to(staging)
    return result


def _export_model(model_dir: Path, name: str, chosen: dict[int, Manifest], staging: Path, result: TritonExport) -> None:
    from dropwise.package.serving import serving_config

    newest = chosen[max(chosen)]
    config = serving_config(newest)
    flavours = (("deterministic", name, DETERMINISTIC_FILE), ("mc", f"{name}_mc", MC_FILE))
    for flavour, triton_name, filename in flavours:
        versions = [v for v, manifest in sorted(chosen.items()) if filename in manifest.files]
        missing = [v for v in chosen if v not in versions]
        for version in missing:
            hint = "run `dropwise convert` on it" if flavour == "deterministic" else "its MC graph was not exported"
            result.skipped[f"{triton_name}/{version}"] = f"package {name}/{version} has no {filename} ({hint})"
        if not versions:
            continue
        target = staging / triton_name
        for version in versions:
            (target / str(version)).mkdir(parents=True)
            shutil.copyfile(model_dir / str(version) / filename, target / str(version) / "model.onnx")
        onnx_path = target / str(versions[-1]) / "model.onnx"
        labels = flavour == "deterministic" and bool(newest.labels)
        if flavour == "deterministic":
            message = deterministic_config(triton_name, newest, onnx_path, config, labels)
            if labels:
                (target / "labels.txt").write_text("\n".join(newest.labels or []) + "\n", encoding="utf-8")
        else:
            message = mc_config(triton_name, newest, onnx_path, config)
        config_path = target / "config.pbtxt"
        config_path.write_text(to_pbtxt(message) + "\n", encoding="utf-8")
        result.models.append(ExportedModel(triton_name, name, flavour, versions, config_path))


# ---------------------------------------------------------------------------------------- command
def export_triton_command(
    repository: Annotated[Path, typer.Argument(help="dropwise model repository to read.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="New Triton model repository (must not exist or be empty).")],
) -> None:
    """Write a Triton model repository (<name> and <name>_mc ONNX models with config.pbtxt) from packages."""
    result = export_triton(repository, out)
    for model in result.models:
        versions = ", ".join(map(str, model.versions))
        print(f"{model.name}: {model.flavour}, versions {versions} -> {model.config_path.parent}")
    for key, reason in sorted(result.skipped.items()):
        print(f"dropwise: skipped {key}: {reason}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the `export-triton` command to the `dropwise` command line."""
    app.command("export-triton")(export_triton_command)
