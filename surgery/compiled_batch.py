"""The compiled MC batch: an engine's tail, its hash masks and the MC summaries as ONE compiled function.

MC dropout (Gal & Ghahramani 2016) runs the tail of the network T times per row and summarises the T
outputs. Eager torch issues every mask operator, every tail operator and some 25-30 summary operators one
by one: on a GPU each is at least one kernel launch. `CompiledBatch` hands the whole group to
``torch.compile`` as one function of (trunk outputs, plan block) where the plan block ``[2 + S, T, R]``
(int64) stacks the trunk row index, the sample-row mask keys and the S precomputed site keys of one group
of requests (``dropwise.surgery.mc_layout``). Inductor then fuses:

* each hash mask (keys -> 16-bit values -> threshold -> rescale, `dropwise.surgery.masks` int64 path) into
  the kernel that consumes it, together with the ``index_select`` of the trunk rows and the pointwise
  layers around it (Triton kernels on a GPU, C++ kernels on the CPU: the same fusion graph);
* the summaries (and, when asked, the per-sample softmax) into a few reduction kernels;

leaving matrix products and convolutions as library calls. Behaviour is that of the eager tail in train
semantics for the chosen sites only (eval everywhere else): the masks are the same bits as the eager
engine's, so results agree with it up to float rounding of the fused arithmetic (tested to 1e-5).

Shapes: T and R are dynamic (one compiled graph serves every batch size); R is padded to at least 2 with a
copy of the first column (torch specialises sizes 0 and 1, which would cost one more compilation), and the
padded column is dropped from the results. T = 1 compiles once more. ``return_samples`` selects one of two
graphs. Each `CompiledBatch` has its own code object, so its compilations are cached per engine and never
count against another engine's recompile limit. ``mode="reduce-overhead"`` adds CUDA graphs on CUDA (one
replay per call; on the CPU it compiles as the default mode).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn

from .mc_layout import Group, Plan
from .summaries import classification_summaries, regression_summaries

__all__ = ["COMPILE_MODES", "CompiledBatch", "compile_mode", "group_blocks"]

COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead")
"""Values of the engine's ``compile`` option (``False`` / ``True`` are ``"off"`` / ``"default"``)."""


def compile_mode(value: bool | str | None) -> str:
    """``"off"``, ``"default"`` or ``"reduce-overhead"`` from the engine's ``compile`` option."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, not {value!r}")
    return str(value)


def group_blocks(layout: Plan, group: Group, sites: Sequence[int], max_rows: int) -> list[tuple[int, np.ndarray]]:
    """The plan blocks ``[2 + S, T, R_c]`` (int64) of one group, in column chunks of at most ``max_rows``
    sample-rows (never less than one row of T samples), each with its number of real columns.

    Rows of a block: trunk row index, sample-row key, then the site keys of ``sites`` (int32 bit patterns,
    sign-extended). A chunk of one column is padded to two with a copy of it (see the module docstring).
    """
    t, r = group.samples, group.rows
    stop = group.start + t * r
    parts = [layout.index[group.start : stop], layout.keys[group.start : stop]]
    parts += [layout.site_bits[s][group.start : stop].astype(np.int64) for s in sites]
    block = np.stack(parts).reshape(len(parts), t, r)
    width = max(1, max_rows // t)
    blocks = []
    for first in range(0, r, width):
        piece = block[:, :, first : first + width]
        real = piece.shape[2]
        if real == 1:
            piece = np.concatenate([piece, piece], axis=2)
        blocks.append((real, np.ascontiguousarray(piece)))
    return blocks


def _fresh(fn: Callable[..., Any], tag: int) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object: torch.compile caches (and limits) compilations per code."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _mc_batch(
    owner: CompiledBatch, live: tuple[Tensor, ...], block: Tensor, return_samples: bool
) -> tuple[Tensor, ...]:
    """The traced body: tail on the block's rows with its keys, then the summaries (see the module docstring)."""
    samples, rows = block.shape[1], block.shape[2]
    index = block[0].reshape(-1)
    owner.context.keys = block[1].reshape(-1)
    owner.context.site_bits = {
        site: block[2 + i].reshape(-1).to(torch.int32) for i, site in enumerate(owner.mask_sites)
    }
    args = [t.index_select(0, index) if b else t for t, b in zip(live, owner.batched, strict=True)]
    if owner.channels_last:
        args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
    per_sample = owner.run_tail(*args).reshape(samples, rows, -1)
    owner.context.keys = None
    owner.context.site_bits = None
    if owner.task == "classification":
        summaries = classification_summaries(per_sample).as_tuple()
        if return_samples:
            return (*summaries, torch.softmax(per_sample.float(), dim=-1), per_sample)
        return summaries
    regression = regression_summaries(per_sample).as_tuple()
    return (*regression, per_sample) if return_samples else regression


class CompiledBatch:
    """One engine's compiled MC group: ``batch(live, block, return_samples)`` -> summary tensors.

    Args:
        run_tail: the engine's tail, returning the tensor MC summarises (its sites read ``context``).
        context: the tail's `dropwise.surgery.keyed_sites.MaskContext`.
        sites: the tail's keyed site modules (their per-pass state is reset around each call).
        mask_sites: site numbers of the hash-mask sites, in the order of the block's site-key rows.
        batched: which trunk outputs carry the batch on dimension 0.
        task: ``"classification"`` or ``"regression"``.
        channels_last: give the tail its 4-D inputs in channels-last format (as the eager engine does).
        mode: ``"default"`` or ``"reduce-overhead"`` (CUDA graphs; only on a CUDA device).
        device: the engine's device.

    Outputs, in order: classification ``CLASSIFICATION_OUTPUTS`` then, with samples, the per-sample softmax
    and logits ``[T, R, K]``; regression ``mean``, ``std`` then, with samples, the outputs ``[T, R, D]``.
    """

    def __init__(
        self,
        run_tail: Callable[..., Tensor],
        context: Any,
        sites: Sequence[nn.Module],
        mask_sites: Sequence[int],
        batched: Sequence[bool],
        task: str,
        *,
        channels_last: bool,
        mode: str,
        device: torch.device,
    ) -> None:
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode must be one of {COMPILE_MODES[1:]}, not {mode!r}")
        self.run_tail = run_tail
        self.context = context
        self.sites = list(sites)
        self.mask_sites = tuple(int(s) for s in mask_sites)
        self.batched = tuple(bool(b) for b in batched)
        self.task = task
        self.channels_last = bool(channels_last)
        self.mode = mode
        self._cuda_graphs = mode == "reduce-overhead" and device.type == "cuda"
        # inductor's vectorised C++ code fails to build for some graphs (DropBlock's boolean dilation, seen
        # with torch 2.13): on the CPU a failed build is retried once with scalar C++ kernels (same kernels,
        # same count, slower loops)
        self._fallbacks: list[dict[str, Any]] = [{"cpp.simdlen": 1}] if device.type == "cpu" else []
        self.options: dict[str, Any] = {}
        self._fn = self._compile({})

    def _compile(self, options: dict[str, Any]) -> Callable[..., Any]:
        self.options = options
        function = _fresh(_mc_batch, id(self) + len(self._fallbacks))
        if self._cuda_graphs:
            return torch.compile(function, dynamic=True, mode="reduce-overhead")
        return torch.compile(function, dynamic=True, options=options or None)

    def __call__(self, live: Sequence[Tensor], block: Tensor, return_samples: bool) -> tuple[Tensor, ...]:
        """Summaries of one plan block (see `group_blocks`); the padded column is still in the outputs."""
        # batched trunk outputs are only read through index_select: no guard on their rows, one graph for 1
        # row and many. Marked on an alias (no kernel), never on the caller's own tensor (an empty trunk).
        live = tuple(t.detach() if b else t for t, b in zip(live, self.batched, strict=True))
        for tensor, batched in zip(live, self.batched, strict=True):
            if batched:
                torch._dynamo.decorators.mark_unbacked(tensor, 0)
        self._reset()
        try:
            # sizes that happen to be equal (rows of the batch, columns of the block) stay distinct symbols;
            # python floats (drop probabilities, scales) are constants of the graph, not inputs
            with (
                fx_config.patch(use_duck_shape=False),  # type: ignore[attr-defined]
                torch._dynamo.config.patch(specialize_float=True),
            ):
                out = self._call_compiled(live, block, bool(return_samples))
            if self._cuda_graphs:
                out = tuple(t.clone() for t in out)  # CUDA graph outputs are overwritten by the next replay
            return out
        finally:
            self._reset()

    def _call_compiled(self, live: tuple[Tensor, ...], block: Tensor, return_samples: bool) -> tuple[Tensor, ...]:
        """Call the compiled function; a failed C++ build is retried with the next fallback options."""
        while True:
            try:
                return self._fn(self, live, block, return_samples)
            except Exception as exc:
                if not self._fallbacks or "CppCompileError" not in f"{type(exc).__name__}: {exc}":
                    raise
                self._reset()
                self._fn = self._compile(self._fallbacks.pop(0))

    def _reset(self) -> None:
        for site in self.sites:
            reset = getattr(site, "reset_pass", None)
            if reset is not None:
                reset()
        self.context.keys = None
        self.context.site_bits = None
