"""Properties every stochastic layer of models.layers shares: modes, generator use, input checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dropwise.models.layers import (
    ClassicDropout,
    Cutout,
    DropBlock2d,
    DropConnectConv2d,
    DropConnectLinear,
    DropPath,
    EmbeddingDropout,
    FractalJoin,
)
from torch import nn


class _Join(nn.Module):
    """FractalJoin over three transforms of one tensor (so it fits the one-input harness)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.join = FractalJoin(3, p=0.5, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join([x, 2 * x, -x])


Factory = Callable[[torch.Generator | None], nn.Module]
CASES: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "classic": (lambda g: ClassicDropout(0.5, generator=g), (8, 16)),
    "embedding": (lambda g: EmbeddingDropout(0.5, generator=g), (8, 5, 16)),
    "dc_linear": (lambda g: DropConnectLinear(16, 8, p=0.5, generator=g), (8, 16)),
    "dc_linear_shared": (lambda g: DropConnectLinear(16, 8, p=0.5, per_example=False, generator=g), (8, 16)),
    "dc_conv": (lambda g: DropConnectConv2d(3, 4, 3, padding=1, p=0.5, generator=g), (4, 3, 6, 6)),
    "drop_path": (lambda g: DropPath(0.5, generator=g), (64, 4)),
    "drop_path_classic": (lambda g: DropPath(0.5, scale_by_keep=False, generator=g), (4, 4)),
    "fractal_join": (lambda g: _Join(g), (64, 4)),
    "drop_block": (lambda g: DropBlock2d(0.3, 3, generator=g), (4, 8, 9, 9)),
    "cutout": (lambda g: Cutout(3, n_holes=2, generator=g), (4, 3, 9, 9)),
}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_draw_uses_the_layer_generator(name: str) -> None:
    factory, shape = CASES[name]
    x = torch.randn(shape, generator=_seeded(123)) + 3.0  # no exact zeros in the input
    torch.manual_seed(0)
    layer_a = factory(_seeded(7)).train()
    torch.manual_seed(0)  # same initial weights for layers with parameters
    layer_b = factory(_seeded(7)).train()
    before = torch.get_rng_state()
    first = layer_a(x)
    assert torch.equal(torch.get_rng_state(), before), "a draw used the global RNG instead of self.generator"
    second = layer_b(x)
    assert torch.equal(first, second), "same generator seed must give the same sample"
    layer = factory(_seeded(7)).train()
    draws = [layer(x) for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:]), "train mode must be stochastic"


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_is_deterministic_and_draws_nothing(name: str) -> None:
    factory, shape = CASES[name]
    x = torch.randn(shape, generator=_seeded(5))
    generator = _seeded(1)
    layer = factory(generator).eval()
    state = generator.get_state()
    assert torch.equal(layer(x), layer(x))
    assert torch.equal(generator.get_state(), state), "eval mode must not draw random numbers"


@pytest.mark.parametrize(
    "build",
    [
        lambda: ClassicDropout(1.5),
        lambda: EmbeddingDropout(-0.1),
        lambda: DropPath(float("nan")),
        lambda: DropBlock2d(2.0),
        lambda: FractalJoin(2, p=1.01),
        lambda: DropConnectLinear(3, 3, p=-1.0),
        lambda: Cutout(3, p=3.0),
    ],
)
def test_bad_probability_is_rejected(build: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError, match="p"):
        build()


def test_non_numeric_probability_is_rejected() -> None:
    with pytest.raises(TypeError):
        ClassicDropout("0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DropPath(True)  # type: ignore[arg-type]


def test_generator_on_another_device_type_is_a_clear_error() -> None:
    layer = ClassicDropout(0.5, generator=torch.Generator())  # a CPU generator
    with pytest.raises(ValueError, match="generator"):
        layer(torch.ones(3, device="meta"))


def test_p_attribute_is_a_float_drop_probability() -> None:
    for factory, _ in CASES.values():
        layer = factory(None)
        inner = layer.join if isinstance(layer, _Join) else layer
        assert isinstance(inner.p, float)
        assert inner.generator is None
