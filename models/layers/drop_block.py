"""DropBlock for convolutional feature maps, Ghiasi et al. 2018.

Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018.

Train, for ``x: [B, C, H, W]`` at drop probability ``p`` and block size ``bs``:

1. the effective block is ``bh = min(bs, H)`` by ``bw = min(bs, W)`` (a map smaller than the block is
   dropped whole or not at all);
2. seeds are drawn only in the VALID region (where a whole block fits), ``(H - bh + 1) x (W - bw + 1)``,
   independently per sample AND per channel, each with probability
   ``gamma = p / (bh * bw) * (H * W) / ((H - bh + 1) * (W - bw + 1))`` (Ghiasi's eq. 1 for non-square maps)
   so that the expected number of seeds covering a pixel, averaged over the map, is ``p``;
3. each seed zeroes the ``bh x bw`` square it anchors (a dilation of the seed mask by shifted ORs; any
   block size, even or odd);
4. the kept activations are scaled by ``count(M) / count_ones(M)`` (the paper's algorithm 1, step 6),
   counted over the whole tensor (``normalize="batch"``, the default: the paper's reference code
   normalises over the batch) or over each sample's ``C * H * W`` values (``normalize="sample"``).

Both preserve the expectation in the same sense: over the counted set the rescaled mask sums to
``count(M)`` exactly (unless all of it is dropped), so the expected mean factor is 1 and a constant input
keeps its expected total. Per position neither factor is 1 in expectation (DropBlock drops central pixels
more often than edge ones, e.g. 0.85 vs 1.17 on an 8x8 map, p = 0.2, block 3); the two modes agree per
position up to the ratio-of-counts bias of the per-sample count, O(1 / (C * H * W)) (under 2% at 256
values per sample; tested). ``"batch"`` couples the rows of a batch (one sample's output depends on the
masks of its companions); with ``"sample"`` each row depends only on its own mask, which MC inference needs
to reproduce a seeded row whatever else shares its batch (`dropwise.surgery.keyed_sites.TrainModeSite` selects it inside
the MC engine). A sample whose mask is all zeros stays 0.

Because blocks overlap, the zeroed fraction is slightly below ``p`` (exactly ``p`` when the block covers
the map). Eval: ``x``. MC: as train at the current ``drop_prob`` (per-sample rescale in the MC engine).

``DropBlockSchedule`` ramps ``drop_prob`` linearly from 0 to the target ``p`` (the paper's linear
keep-probability schedule from 1 to ``1 - p``).

Unlike timm's ``DropBlock2d`` (one mask shared by all channels by default, seeds anywhere while gamma
assumes the valid region: it zeroes ~92% of a 7x7 map at p=0.1, block 7), seeds and masks here follow the
paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_generator, check_probability, torch_function_visible

__all__ = [
    "NORMALIZE_MODES",
    "DropBlock2d",
    "DropBlockSchedule",
    "drop_block2d",
    "drop_block_gamma",
    "drop_block_mask",
]

NORMALIZE_MODES: tuple[str, ...] = ("batch", "sample")
"""Sets the rescale ``count(M) / count_ones(M)`` is counted over: the whole tensor or each sample."""


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return block_size


def _check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    return normalize


def drop_block_gamma(p: float, block_size: int, height: int, width: int) -> float:
    """Seed probability for drop probability ``p``, block ``block_size`` on an ``height x width`` map."""
    p = check_probability(p)
    bh, bw = min(_check_block_size(block_size), height), min(block_size, width)
    valid = (height - bh + 1) * (width - bw + 1)
    return p / (bh * bw) * (height * width) / valid


def drop_block_mask(
    shape: tuple[int, int, int, int],
    p: float,
    block_size: int,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A {0, 1} keep-mask of ``shape`` = ``[B, C, H, W]`` with valid-region seeds per sample and channel."""
    b, c, h, w = shape
    bh, bw = min(block_size, h), min(block_size, w)
    gamma = drop_block_gamma(p, block_size, h, w)
    check_generator(generator, like.device)
    vh, vw = h - bh + 1, w - bw + 1
    seeds = torch.rand((b, c, vh, vw), device=like.device, generator=generator) < gamma
    blocks = dilate_seeds_by_max_pool(seeds, bh, bw) if torch.onnx.is_in_onnx_export() else dilate_seeds(seeds, bh, bw)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (~blocks).to(dtype)


def dilate_seeds(seeds: Tensor, bh: int, bw: int) -> Tensor:
    """The drop blocks of boolean ``seeds: [B, C, vh, vw]``: ``[B, C, vh + bh - 1, vw + bw - 1]``, True where dropped.

    A seed at (i, j) anchors the block rows i..i+bh-1, cols j..j+bw-1: the seeds are dilated by OR-ing shifted
    copies, rows then columns (bh + bw boolean passes; several times faster than max_pool2d on the CPU).
    """
    b, c, vh, vw = seeds.shape
    h, w = vh + bh - 1, vw + bw - 1
    rows = torch.zeros((b, c, h, vw), dtype=torch.bool, device=seeds.device)
    for k in range(bh):
        rows[:, :, k : k + vh] |= seeds
    blocks = torch.zeros((b, c, h, w), dtype=torch.bool, device=seeds.device)
    for k in range(bw):
        blocks[..., k : k + vw] |= rows
    return blocks


def dilate_seeds_by_max_pool(seeds: Tensor, bh: int, bw: int) -> Tensor:
    """`dilate_seeds` as one zero-padded ``bh x bw`` max-pool of the {0, 1} seeds: the same booleans.

    Used while ``torch.onnx.export`` traces: the shifted in-place ORs become ``bh + bw`` ScatterND nodes,
    each between two Transposes, on the T * B rows of an MC graph, which make the export several seconds
    slower and ONNX Runtime's MC run about twice as slow (cnn_mnist, ``bench/convert_time.py``); Pad + MaxPool
    is two nodes. The torch path keeps the shifted ORs (faster there).
    """
    padded = nn.functional.pad(seeds.to(torch.float32), (bw - 1, bw - 1, bh - 1, bh - 1))
    return nn.functional.max_pool2d(padded, (bh, bw), stride=1) > 0.5


@torch_function_visible
def drop_block2d(
    x: Tensor,
    p: float = 0.1,
    block_size: int = 7,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    normalize: str = "batch",
) -> Tensor:
    """DropBlock on ``x: [B, C, H, W]`` (see module docstring); identity when not ``training``.

    ``normalize``: ``"batch"`` rescales by the kept fraction of the whole tensor (Ghiasi 2018),
    ``"sample"`` by that of each sample (rows independent of each other); both preserve the expectation.
    """
    p = check_probability(p)
    _check_block_size(block_size)
    _check_normalize(normalize)
    if x.dim() != 4:
        raise ValueError(f"drop_block2d expects [batch, channels, height, width], got shape {tuple(x.shape)}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    batch, channels, height, width = x.shape
    mask = drop_block_mask((batch, channels, height, width), p, block_size, x, generator)
    if normalize == "sample":
        per_sample = mask[0].numel()
        scale = per_sample / mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    else:
        scale = mask.numel() / mask.sum().clamp_min(1.0)
    return x * (mask * scale)


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi 2018): zero contiguous ``block_size`` squares, per sample and channel; eval ``x``.

    Args:
        p: TARGET drop probability; ``self.drop_prob`` is the probability used now (starts at ``p``;
            ``DropBlockSchedule`` ramps it from 0 to ``p``).
        block_size: side of the dropped square (clamped to the map size).
        generator: optional ``torch.Generator`` used for every draw.
        normalize: ``"batch"`` (default, Ghiasi 2018: rescale by the kept fraction of the whole batch) or
            ``"sample"`` (each sample by its own kept fraction, so rows do not depend on each other; what
            the MC engine uses). Both preserve the expectation (module docstring). Kept in the attribute
            ``normalize``.
    """

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        *,
        generator: torch.Generator | None = None,
        normalize: str = "batch",
    ) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.block_size = _check_block_size(block_size)
        self.drop_prob = self.p
        self.generator = generator
        self.normalize = _check_normalize(normalize)

    def forward(self, x: Tensor) -> Tensor:
        return drop_block2d(
            x,
            self.drop_prob,
            self.block_size,
            training=self.training,
            generator=self.generator,
            normalize=getattr(self, "normalize", "batch"),  # modules pickled before the option: batch
        )

    def extra_repr(self) -> str:
        extra = "" if getattr(self, "normalize", "batch") == "batch" else f", normalize={self.normalize!r}"
        return f"p={self.p}, block_size={self.block_size}, drop_prob={self.drop_prob}{extra}"


class DropBlockSchedule:
    """Linear schedule of every ``DropBlock2d`` in ``model``: ``drop_prob = p * min(step / total_steps, 1)``.

    Construction sets step 0 (``drop_prob = 0``); call ``step()`` after each optimiser step. A model without
    DropBlock2d layers is accepted (the schedule then does nothing; ``blocks`` is empty).
    """

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.blocks: list[DropBlock2d] = [m for m in model.modules() if isinstance(m, DropBlock2d)]
        self.total_steps = total_steps
        self.current_step = 0
        self.set_step(0)

    @property
    def fraction(self) -> float:
        """Fraction of the ramp completed, in [0, 1]."""
        return min(self.current_step / self.total_steps, 1.0)

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (e.g. when resuming) and update every block's ``drop_prob``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.current_step = step
        for block in self.blocks:
            block.drop_prob = block.p * self.fraction

    def step(self) -> None:
        """Advance one step."""
        self.set_step(self.current_step + 1)
