"""The torch runtime: a package's network on CPU or CUDA, deterministic and MC-dropout.

Deterministic predictions run the network in eval mode. MC predictions switch only the dropout-family
layers (those with a `generator`, see docs/CONTRACTS.md "Layers") to their stochastic form, and apply
seeded inverted dropout to PyTorch's own `nn.Dropout` layers through a forward hook (they stay in eval
mode, so BatchNorm and the like are untouched). Every request gets its own `torch.Generator` seeded from
the request's seed, so a request's masks never depend on what else shares its batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from service.runtimes.base import MCGroup, Outputs, PackageSpec, encode_deterministic, encode_mc
from surgery.package import load_package


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

    def __init__(self, spec: PackageSpec, device: str = "auto") -> None:
        self.spec = spec
        self._device = resolve_torch_device(device)
        self.device = self._device.type if self._device.index is None else str(self._device)
        self.provider = f"torch-{self.device}" + (
            f" ({torch.cuda.get_device_name(self._device)})" if self._device.type == "cuda" else ""
        )
        self.model: nn.Module | None = None
        self._stochastic: list[nn.Module] = []
        self._dropouts: list[nn.Dropout] = []

    @property
    def supports_mc(self) -> bool:
        """MC mode needs at least one dropout-family layer."""
        return bool(self._stochastic or self._dropouts)

    def load(self) -> None:
        """Verify and rebuild the network from safetensors, move it to the device and warm it up."""
        loaded = load_package(self.spec.path)
        model = loaded.model
        assert model is not None
        model.eval().to(self._device)
        self.model = model
        self._stochastic = stochastic_modules(model)
        self._dropouts = torch_dropouts(model)
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if self.spec.input_dtype == "int64" and embeddings:
            self.spec = replace(self.spec, input_range=(0, min(e.num_embeddings for e in embeddings)))
        example = np.zeros((1, *self.spec.sample_shape), dtype=self.spec.input_dtype)
        self.predict_deterministic(example)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self._device)

    @torch.inference_mode()
    def predict_deterministic(self, x: np.ndarray) -> Outputs:
        """Eval-mode forward pass over the batch."""
        assert self.model is not None
        raw = self.model(self._tensor(x)).float().cpu().numpy()
        return encode_deterministic(raw, self.spec)

    @contextlib.contextmanager
    def _mc_mode(self, seed: int) -> Iterator[None]:
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        saved = [(m, m.training, m.generator) for m in self._stochastic]
        handles = [m.register_forward_hook(_seeded_inverted_dropout(generator)) for m in self._dropouts]
        try:
            for m in self._stochastic:
                m.train(True)
                m.generator = generator
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, training, gen in saved:
                m.train(training)
                m.generator = gen

    @torch.inference_mode()
    def predict_mc(self, x: np.ndarray, groups: Sequence[MCGroup]) -> list[Outputs]:
        """T stochastic passes per request, each request with its own seeded generator."""
        assert self.model is not None
        results: list[Outputs] = []
        start = 0
        for group in groups:
            rows = self._tensor(x[start : start + group.rows])
            start += group.rows
            expanded = rows.unsqueeze(0).expand(group.samples, *rows.shape).reshape(-1, *rows.shape[1:])
            with self._mc_mode(group.seed):
                out = self.model(expanded)
            samples = out.reshape(group.samples, group.rows, *out.shape[1:])
            results.append(encode_mc(samples, self.spec, group.return_samples))
        return results
