"""Cutout (DeVries 2017) and the max-norm constraint (Srivastava 2014)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dropwise.models.layers import Cutout, DropConnectLinear, MaxNorm, cutout, max_norm_
from torch import nn

SIGMAS = 5.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- Cutout


def test_cutout_centre_anywhere_so_holes_clip_at_borders(assert_binomial: Callable[[int, int, float], None]) -> None:
    size, side, images = 5, 8, 4000
    x = torch.ones(images, 2, side, side)
    holes = cutout(x, size, generator=_gen(1)) == 0  # [B, C, H, W]
    assert torch.equal(holes[:, 0], holes[:, 1]), "a hole covers every channel"
    area = holes[:, 0].flatten(1).sum(1)
    assert int(area.max()) == size * size and int(area.min()) >= 1
    assert bool((area < size * size).any()), "holes near the border are clipped"
    # each hole is an axis-aligned rectangle: area = rows touched * columns touched
    rows = holes[:, 0].any(2).sum(1)
    cols = holes[:, 0].any(1).sum(1)
    assert torch.equal(area, rows * cols)
    # centre uniform over the whole image: corner (0, 0) is covered iff cy <= 2 and cx <= 2
    assert_binomial(int(holes[:, 0, 0, 0].sum()), images, (3 / side) ** 2)
    # centre pixel (4, 4) is covered iff 2 <= cy <= 6 and 2 <= cx <= 6
    assert_binomial(int(holes[:, 0, 4, 4].sum()), images, (5 / side) ** 2)


def test_cutout_probability_holes_and_fill(assert_binomial: Callable[[int, int, float], None]) -> None:
    x = torch.ones(5000, 1, 32, 32)
    out = cutout(x, 1, n_holes=3, p=0.4, fill=-2.5, generator=_gen(2))
    changed = out != 1
    assert torch.all(out[changed] == -2.5)
    touched = changed.flatten(1).any(1)
    assert_binomial(int(touched.sum()), 5000, 0.4)
    per_image = changed.flatten(1).sum(1)[touched]
    assert int(per_image.max()) <= 3
    # 1x1 holes collide with probability about 3/1024 per image: nearly all touched images show 3
    assert float(per_image.float().mean()) > 2.95
    assert torch.equal(x, torch.ones_like(x)), "the input is not modified in place"


def test_cutout_module_modes_and_unbatched_input() -> None:
    layer = Cutout(4, n_holes=2, generator=_gen(3))
    img = torch.ones(3, 10, 12)
    out = layer.train()(img)
    assert out.shape == img.shape and bool((out == 0).any())
    assert torch.equal(layer.eval()(img), img)
    with pytest.raises(ValueError, match="size"):
        Cutout(0)
    with pytest.raises(ValueError, match="C, H, W"):
        cutout(torch.ones(4, 4), 2)


# -------------------------------------------------------------------------------------------- max-norm


def test_max_norm_projects_rows_of_linear_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(20, 6)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([0.1, 1, 10, 100, 0.5, 30]).view(-1, 1))
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    norms = before_w.norm(dim=1)
    max_norm_(layer, 2.0)
    after = layer.weight.detach()
    small = norms <= 2.0
    assert torch.equal(after[small], before_w[small]), "rows inside the ball are untouched"
    assert torch.allclose(after.norm(dim=1)[~small], torch.full((int((~small).sum()),), 2.0), rtol=1e-6)
    assert torch.allclose(after[~small], before_w[~small] * (2.0 / norms[~small]).unsqueeze(1)), "direction kept"
    assert torch.equal(layer.bias, before_b), "biases are not constrained"
    assert layer.weight.grad is None


def test_max_norm_per_conv_filter_and_nested_modules() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv1d(2, 4, 3), DropConnectLinear(5, 4)),
        nn.Linear(9, 2),
    )
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(50)
    embedding = nn.Embedding(4, 3)
    model.append(embedding)
    emb_before = embedding.weight.detach().clone()
    max_norm_(model, 3.0)
    for weight in (model[0].weight, model[2][0].weight, model[2][1].weight, model[3].weight):
        assert float(weight.detach().flatten(1).norm(dim=1).max()) <= 3.0 * (1 + 1e-6)
    assert torch.equal(embedding.weight, emb_before), "embeddings hold no incoming weight vectors"


def test_max_norm_hook_after_each_optimiser_step() -> None:
    torch.manual_seed(2)
    model = nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    constraint = MaxNorm(model, max_norm=1.5)
    handle = constraint.attach(optimizer)
    x = torch.randn(16, 10)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        assert float(model.weight.detach().norm(dim=1).max()) <= 1.5 * (1 + 1e-6)
    handle.remove()
    optimizer.zero_grad()
    model(x).pow(2).sum().neg().backward()
    optimizer.step()
    assert float(model.weight.detach().norm(dim=1).max()) > 1.5, "after removal the hook no longer projects"


def test_max_norm_rejects_bad_radius() -> None:
    with pytest.raises(ValueError):
        max_norm_(nn.Linear(2, 2), 0.0)
    with pytest.raises(ValueError):
        MaxNorm(nn.Linear(2, 2), float("inf"))
    with pytest.raises(TypeError):
        max_norm_(torch.ones(2, 2), 1.0)  # type: ignore[arg-type]
