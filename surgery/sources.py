"""One resolver for every model source: what ``dropwise inspect | fold | mc | convert`` and the service load.

A MODEL / SOURCE argument is one of (the first that fits, in this order):

=================  ==========================================  ==================================================
kind               what the user passes                        what a package written from it records
=================  ==========================================  ==================================================
``onnx``           ``model.onnx``                              (ONNX surgery, ``dropwise convert`` only)
``package``        a package version or model directory, or    its own manifest (recorded ``surgery`` replayed)
                   a repository with ``--name``
``huggingface``    a ``save_pretrained`` directory             factory ``dropwise.models.hf:from_config`` with the
                   (``config.json`` + ``model.safetensors``)   config, head and attention implementation
``zoo``            a zoo name, ``--weights W`` (.safetensors   the zoo entry's factory and kwargs, its dataset
                   or a .pt/.pth state_dict)
``factory``        ``module:factory`` + ``--weights W``,       ``module:factory`` and ``--kwargs``; inputs from
                   ``--kwargs JSON``, ``--dataset`` or         the dataset or the ``--input-shape`` specs
                   ``--input-shape``/``--input-dtype``
=================  ==========================================  ==================================================

Rules, the same for every command and the service:

- **Trust**: importing a module runs its code, so a factory outside ``dropwise.models.`` is imported only
  when the caller allows its prefix (CLI ``--allow-module PREFIX``), for a ``module:factory`` argument and for
  a package's recorded architecture alike.
- **Never unpickle**: weights are safetensors, or a ``.pt`` / ``.pth`` state_dict read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only). A ``.pt2`` ExportedProgram, a pickled
  full model or a ``pytorch_model.bin`` is refused with the reason; symbolic links are refused.
- **Recorded surgery is replayed**: ``ModelSource.model`` is the network after the package's ``surgery`` list
  (``"fold"``, ``"mc"``, ``"mc:head_dropout=P"``), ``ModelSource.base`` the network as its weights describe it.
- Every failure is a ``dropwise.errors.DropwiseError`` with a one-line message: :class:`SourceError`, or the
  ``dropwise.package.PackageError`` of a refused package or factory (never re-wrapped).

``--input-shape`` takes ``1,28,28`` for a one-input model or ``NAME=32`` (repeated) for named inputs;
``--input-dtype`` likewise (``int64`` or ``NAME=int64``). Inputs are the model's positional arguments in order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from dropwise.package import MANIFEST, InputSpec, PackageError, load_package, package_path, resolve_factory
from torch import nn

from dropwise.errors import DropwiseError

__all__ = [
    "DEFAULT_ALLOWED",
    "ModelSource",
    "SourceError",
    "allowed_modules",
    "apply_surgery",
    "generated_inputs",
    "head_dropout",
    "load_state_dict_file",
    "parse_input_specs",
    "parse_kwargs",
    "resolve_source",
]

SourceKind = Literal["package", "zoo", "factory", "huggingface", "onnx"]

DEFAULT_ALLOWED = "dropwise.models."
FACTORY_REFERENCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_ZOO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEAD_DROPOUT = re.compile(r"^mc:head_dropout=([0-9]*\.?[0-9]+)$")
_STATE_DICT_SUFFIXES = (".pt", ".pth")
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_FACTORY = "dropwise.models.hf:from_config"
DEFAULT_SEQUENCE_LENGTH = 128


class SourceError(DropwiseError, ValueError):
    """A model source cannot be resolved: bad reference, untrusted module, refused or unfitting weights."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """``exc`` as one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")


@dataclass
class ModelSource:
    """A resolved source network and what is known about it.

    ``base`` is the network as its weights describe it, ``model`` the same after replaying the recorded
    ``surgery`` (an MC model keeps its sites stochastic); both start in eval mode. ``inputs`` are the
    positional inputs of ``forward`` in order, each with ``shape`` starting at ``-1`` (the batch); empty when
    unknown (a factory without ``--input-shape`` or ``--dataset``).
    """

    kind: SourceKind
    base: nn.Module
    model: nn.Module
    source: str
    architecture: dict[str, Any] | None
    inputs: list[InputSpec] = field(default_factory=list)
    task: str = "classification"
    labels: list[str] | None = None
    surgery: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    target: dict[str, float] | None = None
    name: str | None = None
    dataset: str | None = None
    path: Path | None = None  #: the package directory of a ``package`` source

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """A seeded example batch (see :func:`generated_inputs`): a tensor for one input, a tuple for
        several, None when the inputs are unknown."""
        if not self.inputs:
            return None
        tensors = generated_inputs(self.inputs, batch, seed)
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


# --------------------------------------------------------------------------------------------- small parsers


def allowed_modules(extra: Sequence[str] | None = None) -> list[str]:
    """The one trust rule: ``dropwise.models.`` plus the prefixes the user allowed explicitly."""
    return [DEFAULT_ALLOWED, *(extra or [])]


def parse_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--kwargs``: a JSON object (or an already-parsed mapping) of factory keyword arguments."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"--kwargs is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(value, dict):
        raise SourceError("--kwargs must be a JSON object, e.g. '{\"hidden\": 128}'")
    return value


def _named(values: Sequence[str], option: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        out.append((name.strip(), rest.strip()) if sep else (None, value.strip()))
    if len(out) > 1 and any(n is None for n, _ in out):
        raise SourceError(f"{option} given several times: name each one (NAME=VALUE)")
    return out


def _dims(text: str) -> list[int]:
    try:
        dims = [int(t) for t in text.replace("x", ",").split(",") if t.strip()]
    except ValueError as exc:
        raise SourceError(f"--input-shape must be comma-separated integers, got {text!r}") from exc
    if not dims or any(d < 1 for d in dims):
        raise SourceError(f"--input-shape must be positive integers (without the batch), got {text!r}")
    return dims


def parse_input_specs(
    shapes: Sequence[str] | str | None,
    dtypes: Sequence[str] | str | None,
    base: Sequence[InputSpec] = (),
) -> list[InputSpec]:
    """Apply ``--input-shape`` / ``--input-dtype`` to the known input specs ``base``.

    ``1,28,28`` sets the only input (named ``input`` when none is known); ``NAME=32`` sets or adds input NAME.
    A dtype without a name applies to every input.
    """
    shape_items = _named([shapes] if isinstance(shapes, str) else list(shapes or []), "--input-shape")
    dtype_items = _named([dtypes] if isinstance(dtypes, str) else list(dtypes or []), "--input-dtype")
    specs = {s.name: s.model_dump() for s in base}
    order = [s.name for s in base]
    for name, text in shape_items:
        if name is None:
            if len(order) > 1:
                raise SourceError(f"the model has inputs {order}: name the shape (NAME=DIMS)")
            name = order[0] if order else "input"
        if name not in specs:
            specs[name] = {"name": name, "dtype": "float32"}
            order.append(name)
        specs[name]["shape"] = [-1, *_dims(text)]
    for name, dtype in dtype_items:
        if dtype not in ("float32", "int64"):
            raise SourceError(f"--input-dtype must be float32 or int64, got {dtype!r}")
        targets = order if name is None else [name]
        for target in targets:
            if target not in specs:
                raise SourceError(f"--input-dtype names input {target!r}, which has no --input-shape")
            specs[target]["dtype"] = dtype
            if dtype == "float32":
                specs[target]["range"] = None
    missing = [n for n in order if "shape" not in specs[n]]
    if missing:
        raise SourceError(f"input(s) {missing} have no shape: pass --input-shape NAME=DIMS")
    try:
        return [InputSpec.model_validate(specs[n]) for n in order]
    except ValueError as exc:
        raise SourceError(f"invalid input spec: {one_line(exc)}") from exc


def generated_inputs(inputs: Sequence[InputSpec], batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs of the given specs: standard normal for float32; integers uniform in the input's
    ``range`` (``[0, 2)`` when unknown), except that an input named ``attention_mask`` is all ones (every
    position attended, as a tokenizer pads nothing)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for spec in inputs:
        shape = (batch, *spec.shape[1:])
        if spec.dtype == "float32":
            out.append(torch.randn(shape, generator=generator))
        elif spec.name == "attention_mask":
            out.append(torch.ones(shape, dtype=torch.int64))
        else:
            low, high = spec.range or (0, 2)
            out.append(torch.randint(low, high, shape, generator=generator))
    return out


def head_dropout(surgery: Sequence[str]) -> float | None:
    """The drop probability of a head dropout added by ``dropwise mc`` (``mc:head_dropout=P``), if any."""
    for step in surgery:
        if match := _HEAD_DROPOUT.match(step):
            return float(match.group(1))
    return None


def apply_surgery(model: nn.Module, surgery: Sequence[str], example: Any = None) -> nn.Module:
    """Replay the rewrites of a manifest's ``surgery`` list (``fold``, ``mc``, ``mc:head_dropout=P``).

    Other entries (``recalibrate_bn``) are weight changes already in the weights and are skipped. Both
    rewrites are deterministic functions of the weights, so the replay equals the model that was written.
    """
    from .fold import fold
    from .mc import to_mc

    for step in surgery:
        if step == "fold":
            model = fold(model, example)
        elif step == "mc":
            model = to_mc(model, example_input=example)
        elif (p := head_dropout([step])) is not None:
            model = to_mc(model, example_input=example, add_dropout_before_head=p)
    return model


# --------------------------------------------------------------------------------------------- weights


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling code: safetensors, or a .pt/.pth state_dict (weights_only)."""
    if path.is_symlink():
        raise SourceError(f"{path}: a symbolic link; pass the weights file itself")
    if path.suffix == ".pt2":
        raise SourceError(
            f"{path}: a .pt2 ExportedProgram cannot be loaded without unpickling; pass its module:factory and "
            "the state_dict (torch.save(model.state_dict(), 'model.pt')) or safetensors weights"
        )
    if not path.is_file():
        raise SourceError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on malformed files
            raise SourceError(f"{path}: unreadable safetensors file: {one_line(exc)}") from exc
    if path.suffix in _STATE_DICT_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for anything but tensors and plain containers
            raise SourceError(
                f"{path}: not a plain state_dict (it holds pickled objects, e.g. a whole model saved with "
                "torch.save(model), which loading would run as code); save model.state_dict() instead"
            ) from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} checkpoint form
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise SourceError(f"{path}: not a state_dict (expected a mapping of names to tensors)")
        return state
    raise SourceError(
        f"{path}: weights must be .safetensors or a .pt/.pth state_dict, got {path.suffix or 'no suffix'!r}"
    )


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Load a weights file into ``model`` strictly (every key present, every shape fitting)."""
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SourceError(f"{path}: weights do not fit the network: {one_line(exc)}") from exc


# --------------------------------------------------------------------------------------------- kinds


def _from_package(
    path: Path, name: str | None, version: int | None, allow: list[str], repository_only: bool = False
) -> ModelSource:
    pkg = load_package(path, name, version, allow_modules=allow)  # PackageError: a DropwiseError already
    m = pkg.manifest
    assert pkg.model is not None
    dataset = m.training.get("dataset") if isinstance(m.training.get("dataset"), str) else None
    return ModelSource(
        kind="package",
        base=pkg.model,
        model=pkg.model,
        source=str(pkg.path),
        architecture={"factory": m.architecture.factory, "kwargs": dict(m.architecture.kwargs)},
        inputs=[spec.model_copy() for spec in m.inputs],
        task=m.task,
        labels=m.labels,
        surgery=list(m.surgery),
        training=dict(m.training),
        metrics=dict(m.metrics),
        target=m.target.model_dump() if m.target else None,
        name=m.name,
        dataset=dataset or _zoo_dataset(m.name, m.architecture.factory, m.architecture.kwargs),
        path=pkg.path,
    )


def _zoo_dataset(name: str, factory: str, kwargs: Mapping[str, Any]) -> str | None:
    """The dataset of the zoo entry that built this very architecture (packages older than the record)."""
    from dropwise.models.zoo import ZOO

    spec = ZOO.get(name)
    if spec is not None and (spec.factory, dict(spec.kwargs)) == (factory, dict(kwargs)):
        return spec.dataset
    return None


def _dataset_fields(dataset: str) -> dict[str, Any]:
    from dropwise.models.data import load_dataset

    try:
        ds = load_dataset(dataset)
    except (KeyError, ValueError) as exc:
        raise SourceError(f"unknown dataset {dataset!r}: {one_line(exc)}") from exc
    spec = InputSpec(
        name="input",
        shape=[-1, *ds.input_shape],
        dtype=ds.input_dtype,
        preprocessing=ds.preprocessing,
    )
    return {"inputs": [spec], "task": ds.task, "labels": ds.labels, "target": ds.target, "dataset": dataset}


def _embedding_range(model: nn.Module) -> tuple[int, int] | None:
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return (0, min(sizes)) if sizes else None


def _call_factory(reference: str, kwargs: dict[str, Any], allow: list[str]) -> nn.Module:
    factory = resolve_factory(reference, allow)  # PackageError (a DropwiseError) for an untrusted module
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise SourceError(f"calling {reference} with {kwargs} failed: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"{reference} returned {type(model).__name__}, not an nn.Module")
    return model


def _from_huggingface(path: Path, weights: Path | None, sequence_length: int | None) -> ModelSource:
    from dropwise.models.hf import HEAD_INPUTS, from_pretrained, head_of

    if weights is not None:
        raise SourceError("--weights cannot be combined with a Hugging Face directory (it has model.safetensors)")
    config_path, weights_path = path / HF_CONFIG, path / HF_WEIGHTS
    if config_path.is_symlink() or weights_path.is_symlink():
        raise SourceError(f"{path}: config.json and model.safetensors must be plain files, not links")
    if not weights_path.is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors", ".json"))
        pickled = " (pytorch_model.bin is pickle: re-save with save_pretrained, which writes safetensors)"
        raise SourceError(
            f"{path}: no {HF_WEIGHTS} (found {found}){pickled if 'pytorch_model.bin' in found else ''}; "
            "sharded checkpoints are not supported"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{config_path}: unreadable: {one_line(exc)}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{config_path}: not a JSON object")
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SourceError("a Hugging Face directory needs transformers: pip install 'dropwise[hf]'") from exc
    try:
        head = head_of(config)
        attn = config.get("_attn_implementation") or "sdpa"
        model = from_pretrained(str(path), head, attn)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise SourceError(f"{path}: cannot load the model: {one_line(exc)}") from exc
    config_of: Any = model.model.config  # a transformers PretrainedConfig
    saved = json.loads(config_of.to_json_string(use_diff=False))
    kwargs = {"config": saved, "head": head, "attn_implementation": attn}
    if head == "sequence_classification":
        length = sequence_length or min(DEFAULT_SEQUENCE_LENGTH, int(config.get("max_position_embeddings", 512)))
        vocab = int(config.get("vocab_size", 2))
        ranges = {"input_ids": (0, vocab), "attention_mask": (0, 2)}
        inputs = [InputSpec(name=n, shape=[-1, length], dtype="int64", range=ranges[n]) for n in HEAD_INPUTS[head]]
    else:
        side = config.get("image_size", 224)
        channels = int(config.get("num_channels", 3))
        h, w = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
        inputs = [InputSpec(name="pixel_values", shape=[-1, channels, h, w], dtype="float32")]
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    regression = config.get("problem_type") == "regression" or num_labels == 1
    id2label = config.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(num_labels)] if id2label else None
    if labels and all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        labels = None
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name)[:64].lstrip("._-") or "model"
    return ModelSource(
        kind="huggingface",
        base=model,
        model=model,
        source=str(path),
        architecture={"factory": HF_FACTORY, "kwargs": kwargs},
        inputs=inputs,
        task="regression" if regression else "classification",
        labels=None if regression else labels,
        name=name,
        training={"source": "huggingface", "model_type": config.get("model_type")},
    )


def _refuse_file(path: Path) -> None:
    """A file given as MODEL that is not an ONNX graph: say what to pass instead."""
    if path.suffix == ".pt2":
        load_state_dict_file(path)  # raises with the reason
    if path.suffix in _STATE_DICT_SUFFIXES or path.suffix == ".safetensors":
        load_state_dict_file(path)  # refuses a pickled full model with its own reason
        raise SourceError(
            f"{path}: a weights file holds no network; pass module:factory (or a zoo name) with --weights {path}"
        )
    raise SourceError(f"{path}: not a package directory, a Hugging Face directory, an ONNX file or weights")


def resolve_source(
    source: str,
    *,
    weights: str | Path | None = None,
    name: str | None = None,
    version: int | None = None,
    factory_kwargs: str | Mapping[str, Any] | None = None,
    input_shape: Sequence[str] | str | None = None,
    input_dtype: Sequence[str] | str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    allow_modules: Sequence[str] | None = None,
    require_weights: bool = True,
    repository: str | Path | None = None,
) -> ModelSource:
    """Resolve MODEL (see the module docstring) and replay a package's recorded surgery.

    Args:
        source: the MODEL / SOURCE argument.
        weights: weights for a zoo name or a factory.
        name, version: a model inside a repository directory given as ``source``.
        factory_kwargs: JSON object (or mapping) of keyword arguments for a ``module:factory``.
        input_shape, input_dtype: input specs (see :func:`parse_input_specs`); they override the known ones.
        task: ``classification`` or ``regression`` (a factory's default: classification).
        dataset: a ``dropwise.models.data`` name giving a factory its inputs, task, labels and parity data.
        allow_modules: module prefixes trusted besides ``dropwise.models.`` (CLI ``--allow-module``).
        require_weights: False lets a zoo name or factory run with its initial weights (``inspect``).
        repository: where a zoo name without ``--weights`` finds its latest package.

    Raises:
        SourceError: with a one-line message for anything the user can fix.
    """
    allow = allowed_modules(allow_modules)
    if task is not None and task not in ("classification", "regression"):
        raise SourceError(f"--task must be classification or regression, got {task!r}")
    path = Path(source)
    weights_path = Path(weights) if weights is not None else None
    kwargs_given = factory_kwargs is not None and factory_kwargs != {}
    if path.suffix == ".onnx" and path.is_file():
        raise SourceError(f"{path}: an ONNX graph is converted by `dropwise convert {path}` (no torch network)")
    if path.is_dir() and (path / HF_CONFIG).is_file() and not (path / MANIFEST).exists():
        if name is not None or version is not None or kwargs_given:
            raise SourceError("--name / --version / --kwargs do not apply to a Hugging Face directory")
        shapes = parse_input_specs(input_shape, None, []) if input_shape else []
        resolved = _from_huggingface(path, weights_path, int(shapes[0].shape[1]) if shapes else None)
        input_shape = None
    elif path.is_dir():
        if weights_path is not None:
            raise SourceError("--weights cannot be combined with a package (it has its own weights)")
        if kwargs_given:
            raise SourceError("--kwargs applies to a module:factory reference only")
        resolved = _from_package(path, name, version, allow)
    elif path.is_file() or path.is_symlink():
        _refuse_file(path)
        raise AssertionError("unreachable")
    else:
        if name is not None or version is not None:
            raise SourceError("--name / --version apply to a package repository only")
        if FACTORY_REFERENCE.match(source):
            kwargs = parse_kwargs(factory_kwargs)
            model = _call_factory(source, kwargs, allow)
            fields: dict[str, Any] = _dataset_fields(dataset) if dataset else {}
            resolved = ModelSource(
                kind="factory",
                base=model,
                model=model,
                source=source,
                architecture={"factory": source, "kwargs": kwargs},
                name=source.split(":")[1],
                **fields,
            )
        elif _ZOO_NAME.match(source):
            from dropwise.models.zoo import ZOO, build

            if source not in ZOO:
                raise SourceError(
                    f"{source!r} is not a package or Hugging Face directory, an ONNX file, a zoo name "
                    f"({', '.join(ZOO)}) or a module:factory reference"
                )
            if kwargs_given:
                raise SourceError("--kwargs applies to a module:factory reference only")
            if weights_path is None and repository is not None:
                try:
                    existing = package_path(repository, source)
                except PackageError as exc:
                    raise SourceError(
                        f"no weights for {source!r}: pass --weights FILE or train it first (dropwise train {source})"
                    ) from exc
                return _finish(_from_package(existing, None, None, allow), input_shape, input_dtype, task)
            spec = ZOO[source]
            model = build(source)
            resolved = ModelSource(
                kind="zoo",
                base=model,
                model=model,
                source=source,
                architecture={"factory": spec.factory, "kwargs": dict(spec.kwargs)},
                task=spec.task,
                name=source,
                **{k: v for k, v in _dataset_fields(dataset or spec.dataset).items() if k != "task"},
            )
        else:
            raise SourceError(
                f"{source!r} is not a package or Hugging Face directory, an ONNX file, a zoo name "
                "or a module:factory reference"
            )
        if weights_path is not None:
            load_weights_into(resolved.base, weights_path)
        elif require_weights:
            raise SourceError(f"{source} needs --weights FILE (.safetensors, or a .pt/.pth state_dict)")
        resolved.base.eval()
        if resolved.kind == "factory":
            for spec_ in resolved.inputs:
                if spec_.dtype == "int64" and spec_.range is None:
                    spec_.range = _embedding_range(resolved.base)
    return _finish(resolved, input_shape, input_dtype, task)


def _finish(
    resolved: ModelSource,
    input_shape: Sequence[str] | str | None,
    input_dtype: Sequence[str] | str | None,
    task: str | None,
) -> ModelSource:
    if input_shape or input_dtype:
        resolved.inputs = parse_input_specs(input_shape, input_dtype, resolved.inputs)
        vocabulary = _embedding_range(resolved.base)
        for spec in resolved.inputs:
            if spec.dtype == "int64" and spec.range is None and vocabulary is not None:
                spec.range = vocabulary
    if task is not None:
        resolved.task = task
    if resolved.surgery:
        resolved.model = apply_surgery(resolved.base, resolved.surgery, resolved.example())
    return resolved
