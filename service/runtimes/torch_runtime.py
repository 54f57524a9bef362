"""The torch runtime: a package's network on CPU or CUDA, deterministic and MC-dropout.

Deterministic predictions run the network in eval mode. MC predictions go through `dropwise.surgery.engine.MCEngine`
(trunk once, tail for every sample in one batched pass, per-row hash masks): the MC requests of a dynamic
batch, whatever their T, share one trunk pass, and a seeded request gets the same masks whatever else
shares its batch. Sites without a hash-mask form (DropBlock, DropConnect, FractalJoin) run their own
train-mode code with draws keyed per row, and `dropwise.models.layers.DropBlock2d` rescales per sample inside the
engine, so they share the trunk pass too whenever the engine reports ``rows_independent`` (every draw
keyed per row, no layer that couples rows). Only models with a site that couples rows (one DropConnect
mask for the whole batch, another library's batch-wide DropBlock, functional dropout) run each request in
its own engine call (still one trunk pass per request) to keep the seeded-reproducibility guarantee.

When the engine cannot handle a model (or is not installed), a plain fallback runs: it switches only the
dropout-family layers (those with a `generator`, see docs/CONTRACTS.md "Layers") to their stochastic
form, and applies seeded inverted dropout to PyTorch's own `nn.Dropout` layers through a forward hook
(they stay in eval mode, so BatchNorm and the like are untouched). Every request gets its own
`torch.Generator` seeded from the request's seed, so a request's masks never depend on what else shares
its batch.

On CUDA each runtime issues its work on a CUDA stream of its own (`dropwise.service.runtimes.streams.
ComputeStream`), entered by the one compute thread that runs the model's batches: one model's result copy
then waits only for its own kernels, not for every other model's work on the shared default stream. On the
CPU it is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from dropwise.service.model_inputs import ModelInputs, example_inputs, take_rows
from dropwise.service.runtimes.base import (
    MCGroup,
    Outputs,
    PackageSpec,
    encode_deterministic,
    encode_mc,
    summarise_samples,
)
from dropwise.service.runtimes.streams import ComputeStream
from dropwise.surgery.sources import resolve_source
from torch import nn

log = logging.getLogger("dropwise.torch_runtime")


def resolve_torch_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU raises `RuntimeError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU")
    return torch.device(device)


def stochastic_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout-family layers of `model`: modules with a drop probability `p` and a `generator`."""
    return [m for m in model.modules() if hasattr(m, "generator") and float(getattr(m, "p", 0.0)) > 0]


def torch_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """PyTorch's own (inverted) `nn.Dropout` layers, which draw from the global RNG when training."""
    return [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]


def _seeded_inverted_dropout(generator: torch.Generator) -> Callable[..., torch.Tensor]:
    """A forward hook that applies inverted dropout to an eval-mode `nn.Dropout`, drawing from `generator`."""

    def hook(module: nn.Dropout, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - module.p
        mask = torch.empty_like(output).bernoulli_(keep, generator=generator)
        return output * mask / keep

    return hook


class TorchRuntime:
    """Runs one package with PyTorch (see module docstring)."""

    backend = "torch"

    def __init__(self, spec: PackageSpec, device: str = "auto", mc_compile: str = "off") -> None:
        self.spec = spec
        self.mc_compile = mc_compile  #: the MC engine's ``compile`` option (`Settings.mc_compile`)
        self._device = resolve_torch_device(device)
        self.device = self._device.type if self._device.index is None else str(self._device)
        self.provider = f"torch-{self.device}" + (
            f" ({torch.cuda.get_device_name(self._device)})" if self._device.type == "cuda" else ""
        )
        self._compute = ComputeStream(self._device)
        self.stream = self._compute.stream  #: the CUDA stream every batch of this model runs on (None on CPU)
        self.model: nn.Module | None = None
        self.mc_model: nn.Module | None = None  #: the network after its recorded surgery (MC runs this one)
        self._stochastic: list[nn.Module] = []
        self._dropouts: list[nn.Dropout] = []
        self.engine: Any = None
        self.shares_trunk = False  #: MC requests of one batch share the trunk pass
        self.mc_path = "none"

    @property
    def supports_mc(self) -> bool:
        """MC mode needs at least one dropout-family layer."""
        return self.engine is not None or bool(self._stochastic or self._dropouts)

    @property
    def mc_returns_samples(self) -> bool:
        """The engine and the fallback loop both keep the per-sample outputs when asked."""
        return True

    def load(self) -> None:
        """Verify and rebuild the network through ``dropwise.surgery.sources`` (recorded surgery replayed),
        move it to the device and warm it up.

        Deterministic predictions run the source network in eval mode (what a folded package equals); MC runs
        the network after its recorded surgery, so a ``dropwise mc --add-dropout-before-head`` package is
        sampled with its head dropout.
        """
        source = resolve_source(str(self.spec.path))
        model = source.base
        model.eval().to(self._device)
        self.model = model
        self.mc_model = source.model.to(self._device) if source.model is not model else model
        self._stochastic = stochastic_modules(self.mc_model)
        self._dropouts = torch_dropouts(self.mc_model)
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if self.spec.input_dtype == "int64" and embeddings and self.spec.input_range is None:
            self.spec = replace(self.spec, input_range=(0, min(e.num_embeddings for e in embeddings)))
        example = example_inputs(self.spec, rows=2)
        self._build_engine(self._tensor(example))  # the engine keeps its own copy in the MC state
        self._compute.ready()  # weights and engine buffers were queued on the loading thread's stream
        # the fallback switches the stochastic layers itself, with a seeded generator per request: it starts
        # from eval (an MC model's own train-mode sites would draw from the global generator)
        nn.Module.train(self.mc_model, False)
        self.predict_deterministic(take_rows(example, 0, 1))

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Enter this model's CUDA stream (the calling thread's current stream); nothing on the CPU."""
        return self._compute()

    def _build_engine(self, example: Any) -> None:
        """Use the trunk/tail engine when it supports the model; otherwise keep the fallback loop."""
        assert self.mc_model is not None
        from dropwise.surgery.engine import MCEngine

        try:
            engine = MCEngine(self.mc_model, example, task=self.spec.task, compile=self.mc_compile)
            engine.run_batch(example, [1, 1], [2, 3], [0, 1])  # warm-up and smoke test of the split
            if engine.compile != "off":  # compile the graph with per-sample outputs now, not on a request
                engine.run_batch(example, [1, 1], [2, 3], [0, 1], return_samples=True)
        except Exception as exc:  # a model the engine cannot split or rewrite: the fallback serves it
            log.warning("%s: MC engine unavailable (%s); using the per-request fallback", self.spec.name, exc)
            self.mc_path = "fallback" if self._stochastic or self._dropouts else "none"
            return
        self.engine = engine
        self.shares_trunk = bool(engine.rows_independent)
        self.mc_path = "engine" if self.shares_trunk else "engine-per-request"

    def _tensor(self, x: ModelInputs) -> Any:
        """The inputs on the device: one tensor, or a tuple for a model with several named inputs."""
        if isinstance(x, tuple):
            return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self._device) for a in x)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self._device)

    @torch.inference_mode()
    def predict_deterministic(self, x: ModelInputs) -> Outputs:
        """Eval-mode forward pass over the batch."""
        assert self.model is not None
        with self._on_stream():
            tensors = self._tensor(x)
            raw = (self.model(*tensors) if isinstance(tensors, tuple) else self.model(tensors)).float().cpu().numpy()
        return encode_deterministic(raw, self.spec, self.spec.temperatures[0])

    @contextlib.contextmanager
    def _mc_mode(self, seed: int) -> Iterator[None]:
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        saved = [(m, m.training, m.generator) for m in self._stochastic]
        handles = [m.register_forward_hook(_seeded_inverted_dropout(generator)) for m in self._dropouts]
        try:
            for m in self._stochastic:
                m.train(True)
                m.generator = generator  # type: ignore[assignment]  # a plain attribute of our layers
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training, gen in saved:
                m.train(training)
                m.generator = gen

    @torch.inference_mode()
    def predict_mc(
        self, x: ModelInputs, groups: Sequence[MCGroup], check: Callable[[], None] | None = None
    ) -> list[Outputs]:
        """MC outputs of several requests stacked in `x` (see the module docstring); `check` runs before
        every chunk of the engine's tail (or every request of the fallback) and may raise to abandon."""
        with self._on_stream():
            return self._predict_mc(x, groups, check)

    def _predict_mc(
        self, x: ModelInputs, groups: Sequence[MCGroup], check: Callable[[], None] | None = None
    ) -> list[Outputs]:
        if self.engine is None:
            return self._predict_mc_fallback(x, groups, check)
        tensor = self._tensor(x)
        if self.shares_trunk:
            results = self.engine.run_batch(
                tensor,
                [g.rows for g in groups],
                [g.num_samples for g in groups],
                [g.seed for g in groups],
                return_samples=any(g.return_samples for g in groups),
                to_host=True,  # one device-to-host copy per batch
                check=check,
            )
        else:
            results, start = [], 0
            for g in groups:
                part = take_rows(tensor, start, start + g.rows)
                start += g.rows
                results += self.engine.run_batch(
                    part, [g.rows], [g.num_samples], [g.seed], g.return_samples, check=check
                )
        t_mc = self.spec.temperatures[1]
        return [encode_mc(r.as_dict(), self.spec, g.return_samples, t_mc) for r, g in zip(results, groups, strict=True)]

    def _predict_mc_fallback(
        self, x: ModelInputs, groups: Sequence[MCGroup], check: Callable[[], None] | None = None
    ) -> list[Outputs]:
        """T stochastic passes per request, each request with its own seeded generator."""
        assert self.mc_model is not None
        results: list[Outputs] = []
        start = 0
        for group in groups:
            if check is not None:
                check()
            tensors = self._tensor(take_rows(x, start, start + group.rows))
            rows: tuple[torch.Tensor, ...] = tensors if isinstance(tensors, tuple) else (tensors,)
            start += group.rows
            n = group.num_samples
            expanded = [r.unsqueeze(0).expand(n, *r.shape).reshape(-1, *r.shape[1:]) for r in rows]
            with self._mc_mode(group.seed):
                out = self.mc_model(*expanded)
            per_sample = out.reshape(n, group.rows, *out.shape[1:])
            values = summarise_samples(per_sample, self.spec.task)
            results.append(encode_mc(values, self.spec, group.return_samples, self.spec.temperatures[1]))
        return results
