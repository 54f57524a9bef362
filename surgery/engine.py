"""The fast MC-dropout engine: trunk once, tail for all T samples in one batched pass, hash masks.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation") averages T stochastic forward
passes. Only the layers from the first stochastic site on differ between passes, so the engine

1. splits the model (``dropwise.surgery.split``) before its first CHOSEN site: a deterministic trunk and a tail;
2. runs the trunk once per request (eval mode, no autograd);
3. repeats the tail's inputs T times (sample-major rows ``n = t * B + b``) and runs the tail once for all
   samples, in chunks of at most ``chunk_rows`` rows (cache-sized by default, within a memory budget);
4. replaces every chosen site of the tail by its hash-mask form (`dropwise.surgery.masks.HashMaskSite`): masks
   from a counter-based hash of (request seed, row within request, sample, site, position), far cheaper
   than ``F.dropout``'s per-element Bernoulli draw and reproducible per row whatever else is in the batch.
   Sites with no hash form (DropBlock, DropConnect, FractalJoin, functional dropout inside a module's
   forward) run their own train-mode forward (`dropwise.surgery.masks.TrainModeSite`) with torch's random draws
   routed to the same hash (`dropwise.surgery.masks.KeyedRandom`): per-example draws stay keyed per row, and
   ``dropwise.models.layers.DropBlock2d`` rescales per sample (``normalize="sample"``) instead of over the whole
   batch. ``rows_independent`` says whether every site keeps rows apart; a draw shared by the whole batch
   (e.g. one DropConnect mask for all rows), another library's DropBlock (batch-wide rescale) or a
   functional dropout (its draws are not routed to the hash) reproduce only for an identical batch;
5. summarises the per-sample outputs ``[T, B, K]`` (``dropwise.surgery.summaries``, docs/DESIGN.md §3).

Sites that are not chosen behave as in eval mode (``sites="last"`` is TorchUncertainty's ``last_layer``:
the longest shared trunk). BatchNorm always uses its running statistics and is never updated. The engine
works on its own deep copy of the model: rebuild it after changing the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .masks import HashMaskSite, MaskContext, TrainModeSite, row_keys, sample_keys
from .sites import Site, call_model, find_sites
from .split import SplitModel, split
from .summaries import classification_summaries, regression_summaries

__all__ = ["MCEngine", "MCResult", "choose_sites", "mc_predict"]

_FORMS = {
    "dropout": "element",
    "dropout1d": "channel",
    "dropout2d": "channel",
    "dropout3d": "channel",
    "alpha_dropout": "alpha",
    "feature_alpha_dropout": "feature_alpha",
    "classic_dropout": "classic",
    "embedding_dropout": "embedding",
    "stochastic_depth_classic": "path_classic",
}
_MAX_SEED = 1 << 63


@dataclass
class MCResult:
    """MC-dropout summaries of one request (docs/DESIGN.md §3; see ``dropwise.surgery.summaries``).

    Classification fills ``mean_probs``, ``predictive_entropy``, ``expected_entropy``,
    ``mutual_information``, ``variation_ratio`` and ``std`` (per class); regression fills ``mean`` and
    ``std``. ``samples`` holds the per-sample outputs ``[T, B, K]`` when asked for. ``seed`` is the seed
    the masks were drawn from (pass it back to reproduce the result).
    """

    task: str
    n_samples: int
    seed: int
    std: Tensor
    mean_probs: Tensor | None = None
    predictive_entropy: Tensor | None = None
    expected_entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    variation_ratio: Tensor | None = None
    mean: Tensor | None = None
    samples: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """The non-empty tensors by name."""
        names = (
            "mean_probs",
            "predictive_entropy",
            "expected_entropy",
            "mutual_information",
            "variation_ratio",
            "mean",
            "std",
            "samples",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _as_args(x: Any) -> tuple[Tensor, ...]:
    if isinstance(x, tuple | list):
        return tuple(x)
    return (x,)


def _execution_order(model: nn.Module, example_input: Any, sites: Sequence[Site]) -> list[Site]:
    """Sites sorted by the order their modules first run on ``example_input`` (unreached ones last)."""
    modules = dict(model.named_modules())
    order: dict[str, int] = {}
    handles = []
    for site in sites:
        module = modules.get(site.name)
        if module is None or site.name in order:
            continue

        def hook(_m: nn.Module, _i: Any, name: str = site.name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(sites, key=lambda s: order.get(s.name, len(order)))


def choose_sites(found: Sequence[Site], sites: str | Sequence[str | Site] | None) -> list[Site]:
    """The chosen subset of ``found`` (execution order): None/"all", "last", "first", or names/keys/Sites."""
    if sites is None or sites == "all":
        return list(found)
    if sites == "last":
        return [found[-1]]
    if sites == "first":
        return [found[0]]
    if isinstance(sites, str):
        sites = [sites]
    wanted = {s.key if isinstance(s, Site) else str(s) for s in sites}
    chosen = [s for s in found if s.key in wanted or s.name in wanted]
    missing = wanted - {s.key for s in chosen} - {s.name for s in chosen}
    if missing:
        raise ValueError(f"unknown site(s): {', '.join(sorted(missing))}; known: {[s.key for s in found]}")
    return chosen


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _replacement(site: Site, module: nn.Module, index: int, context: MaskContext) -> nn.Module:
    """The MC form of one chosen site: a hash-mask site when one exists, else a train-mode wrapper."""
    form = _FORMS.get(site.kind) if site.function is None else None
    if site.kind == "drop_path" and site.function is None:
        form = "path" if getattr(module, "scale_by_keep", True) else "path_classic"
    if form is None:
        return TrainModeSite(module, context, index, functional=site.function is not None)
    return HashMaskSite(context, index, float(site.p), form)


def _rewrite_tail(
    tail: nn.Module, model: nn.Module, found: Sequence[Site], chosen: Sequence[Site], context: MaskContext
) -> list[nn.Module]:
    """Replace each chosen site module inside ``tail`` (found by identity) by its MC form."""
    in_tail = {}
    for name, module in tail.named_modules(remove_duplicate=False):
        in_tail.setdefault(id(module), []).append(name)
    index = {s.key: i for i, s in enumerate(found)}
    replaced: list[nn.Module] = []
    for site in chosen:
        module = model.get_submodule(site.name) if site.name else model
        names = in_tail.get(id(module), [])
        if not names:
            continue  # the site lies in the trunk: impossible for the split's own sites, kept for safety
        replacement = _replacement(site, module, index[site.key], context)
        for name in names:
            if name == "":
                raise ValueError("the root module itself is a site: wrap it in a container first")
            _set_submodule(tail, name, replacement)
        replaced.append(replacement)
    return replaced


def _batched_outputs(trunk: nn.Module, example: tuple[Tensor, ...]) -> list[bool]:
    """Which trunk outputs carry the batch on dimension 0 (their size follows the input batch)."""
    doubled = tuple(torch.cat([a, a]) if isinstance(a, Tensor) else a for a in example)
    with torch.no_grad():
        one = trunk(*example)
        two = trunk(*doubled)
    return [
        isinstance(a, Tensor) and a.dim() > 0 and b.shape[0] == 2 * a.shape[0] for a, b in zip(one, two, strict=True)
    ]


def _bytes_per_row(model: nn.Module, example: tuple[Tensor, ...]) -> int:
    """Largest activation of any module per input row, in bytes (for the chunk size)."""
    rows = example[0].shape[0] if example and isinstance(example[0], Tensor) and example[0].dim() else 1
    largest = max((a.element_size() * a[0].numel() for a in example if isinstance(a, Tensor) and a.dim()), default=4)
    handles = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal largest
        if isinstance(out, Tensor):
            largest = max(largest, out.element_size() * out.numel() // max(rows, 1))

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for handle in handles:
            handle.remove()
    return largest


def _fresh_seed() -> int:
    return int(torch.randint(0, 1 << 62, (1,)).item())


class MCEngine:
    """MC dropout with a split model kept for repeated calls (see the module docstring).

    Args:
        model: any ``nn.Module`` with dropout-family sites; the engine deep-copies it and uses the copy in
            eval mode except for the chosen sites.
        example_input: a tensor or tuple of tensors with a batch dimension (used to find the sites, split the
            model and size the chunks).
        sites: ``None`` / ``"all"`` (every site), ``"last"`` (only the last site to run, TorchUncertainty's
            ``last_layer``), ``"first"``, or site names / keys / ``Site`` objects.
        task: ``"classification"`` (tail output ``[B, K]`` logits) or ``"regression"`` (``[B, ...]``).
        chunk_rows: most sample-rows per tail pass. Default: rows whose largest activation fills about
            ``chunk_bytes`` (1 MiB: cache-sized chunks measured faster on the CPU than one big pass), at
            least 128 rows, and never more than ``memory_budget`` (bytes) allows.
        compile: run the tail through ``torch.compile`` (fuses mask generation into the tail's kernels).
        channels_last: give the tail its 4-D inputs in channels-last memory format (same values; on the
            CPU torch's NCHW max-pooling of odd-sized maps was measured 40x slower than channels-last).
            Default: on for CPU models.
        exportable: use the int64 mask path that ``torch.onnx.export`` accepts (``dropwise.surgery.mc_export``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        sites: str | Sequence[str | Site] | None = None,
        *,
        task: str = "classification",
        chunk_rows: int | None = None,
        memory_budget: int = 256 << 20,
        chunk_bytes: int = 1 << 20,
        compile: bool = False,
        exportable: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', not {task!r}")
        self.task = task
        self.model = copy.deepcopy(model).eval()
        example = _as_args(example_input)
        found = find_sites(self.model, example_input)
        if not found:
            raise ValueError("the model has no stochastic site: MC dropout would return T identical samples")
        self.sites: list[Site] = _execution_order(self.model, example_input, found)
        self.chosen: list[Site] = choose_sites(self.sites, sites)
        if not self.chosen:
            raise ValueError("no site chosen")
        self.split: SplitModel = split(self.model, example_input, sites=[s.key for s in self.chosen])
        self.context = MaskContext(exportable=exportable)
        self.trunk = self.split.trunk.eval()
        self.tail = self.split.tail.eval()
        self.replaced = _rewrite_tail(self.tail, self.model, self.sites, self.chosen, self.context)
        self._batched = _batched_outputs(self.trunk, example)
        if chunk_rows is None:
            per_row = _bytes_per_row(self.model, example)
            chunk_rows = min(max(128, chunk_bytes // per_row), max(1, memory_budget // (4 * per_row)))
        self.chunk_rows = int(chunk_rows)
        self._tail_fn = torch.compile(self.tail, dynamic=True) if compile else self.tail
        self.channels_last = self._device().type == "cpu" if channels_last is None else bool(channels_last)
        if any(isinstance(m, TrainModeSite) for m in self.replaced):
            # one small eager pass so the train-mode sites see their draws (`rows_independent`)
            self._probe(example)

    @torch.inference_mode()
    def _probe(self, example: tuple[Tensor, ...]) -> None:
        """One eager tail pass (T = 1, seed 0) on ``example``; its outputs are discarded."""
        live = self.trunk(*example)
        index, keys = self.layout([int(example[0].shape[0])], [1], [0])
        self.context.keys = keys
        try:
            self.tail(*[t.index_select(0, index) if b else t for t, b in zip(live, self._batched, strict=True)])
        finally:
            self.context.keys = None

    @property
    def rows_independent(self) -> bool:
        """Whether a seeded request's result can never depend on its batch companions.

        True when every chosen site is a hash-mask site or a `masks.TrainModeSite` whose
        ``rows_independent`` holds (``dropwise.models.layers`` DropBlock2d / DropConnect / FractalJoin with every
        draw keyed per row). When False, `run_batch` still works, but a seeded request reproduces only for
        an identical batch: run such requests one per call.
        """
        return all(m.rows_independent for m in self.replaced if isinstance(m, TrainModeSite))

    @property
    def captured(self) -> bool:
        """Whether the split captured a trunk (False: the whole model runs T times, still batched)."""
        return self.split.captured

    def __call__(self, x: Any, samples: int = 32, seed: int | None = None, return_samples: bool = False) -> MCResult:
        """MC summaries of the batch ``x`` from ``samples`` passes (one request: all rows share ``seed``)."""
        args = _as_args(x)
        rows = int(args[0].shape[0])
        return self.run_batch(args, [rows], [samples], [seed], return_samples=return_samples)[0]

    def layout(
        self, rows_per_request: Sequence[int], samples_per_request: Sequence[int], seeds: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Tail rows of a batch of requests: (trunk row index ``[M]``, mask key ``[M]``), M = sum T_r B_r.

        Request r's rows are repeated sample-major (``t * B_r + b``) in one contiguous block; the key of a
        row depends only on (seed_r, row index within request r, t).
        """
        device = self._device()
        indices, keys = [], []
        offset = 0
        for n_rows, n_samples, seed in zip(rows_per_request, samples_per_request, seeds, strict=True):
            local = torch.arange(n_rows, dtype=torch.int64, device=device)
            seed_t = torch.full((n_rows,), int(seed), dtype=torch.int64, device=device)
            indices.append((local + offset).repeat(n_samples))
            keys.append(sample_keys(row_keys(seed_t, local), n_samples))
            offset += n_rows
        return torch.cat(indices), torch.cat(keys)

    def _device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    @torch.inference_mode()
    def tail_outputs(self, live: Sequence[Tensor], index: Tensor, keys: Tensor) -> Tensor:
        """Run the tail on trunk rows ``index`` with mask keys ``keys``, chunked; outputs ``[M, ...]``."""
        outputs = []
        total = int(index.shape[0])
        for start in range(0, total, self.chunk_rows):
            stop = min(start + self.chunk_rows, total)
            idx = index[start:stop]
            self.context.keys = keys[start:stop]
            args = [t.index_select(0, idx) if batched else t for t, batched in zip(live, self._batched, strict=True)]
            if self.channels_last:
                args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
            try:
                outputs.append(self._tail_fn(*args))
            finally:
                self.context.keys = None
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.inference_mode()
    def run_batch(
        self,
        x: Any,
        rows_per_request: Sequence[int],
        samples_per_request: Sequence[int],
        seeds: Sequence[int | None],
        return_samples: bool = False,
    ) -> list[MCResult]:
        """Several requests batched along dimension 0 of ``x``, each with its own T and seed.

        The trunk runs once for all rows; the tail runs once (chunked) for all ``sum_r T_r * B_r``
        sample-rows. A ``None`` seed draws a fresh one from torch's global generator (reported in the
        result). Returns one `MCResult` per request, in order.
        """
        args = _as_args(x)
        rows = [int(r) for r in rows_per_request]
        samples = [int(t) for t in samples_per_request]
        if not (len(rows) == len(samples) == len(seeds)):
            raise ValueError("rows_per_request, samples_per_request and seeds must have the same length")
        if sum(rows) != int(args[0].shape[0]) or min(rows, default=0) < 1:
            raise ValueError(f"rows_per_request {rows} must be positive and sum to the batch size {args[0].shape[0]}")
        if min(samples, default=0) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        resolved = [_fresh_seed() if s is None else int(s) for s in seeds]
        for s in resolved:
            if not 0 <= s < _MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {s}")
        self.trunk.eval()
        self.tail.eval()
        live = self.trunk(*args)
        index, keys = self.layout(rows, samples, resolved)
        out = self.tail_outputs(live, index, keys)
        results = []
        offset = 0
        for n_rows, n_samples, seed in zip(rows, samples, resolved, strict=True):
            block = out[offset : offset + n_rows * n_samples]
            offset += n_rows * n_samples
            results.append(self._summarise(block.reshape(n_samples, n_rows, -1), seed, return_samples))
        return results

    def _summarise(self, per_sample: Tensor, seed: int, return_samples: bool) -> MCResult:
        kept = per_sample if return_samples else None
        if self.task == "classification":
            s = classification_summaries(per_sample)
            return MCResult(
                "classification",
                per_sample.shape[0],
                seed,
                s.std,
                mean_probs=s.mean_probs,
                predictive_entropy=s.predictive_entropy,
                expected_entropy=s.expected_entropy,
                mutual_information=s.mutual_information,
                variation_ratio=s.variation_ratio,
                samples=kept,
            )
        r = regression_summaries(per_sample)
        return MCResult("regression", per_sample.shape[0], seed, r.std, mean=r.mean, samples=kept)


def mc_predict(
    model: nn.Module,
    x: Any,
    samples: int = 32,
    seed: int | None = None,
    sites: str | Sequence[str | Site] | None = None,
    *,
    task: str = "classification",
    return_samples: bool = False,
) -> MCResult:
    """One-shot MC dropout (Gal & Ghahramani 2016) of batch ``x``: builds an `MCEngine` and calls it once.

    The engine is built on the first `EXAMPLE_ROWS` rows of ``x`` (finding sites, splitting and sizing the
    chunks need an example, not the whole batch: building on 1000 rows cost more than the MC work itself),
    then runs on all of ``x``. The result is the same as a prebuilt engine's.
    """
    engine = MCEngine(model, _example_slice(x), sites, task=task)
    return engine(x, samples=samples, seed=seed, return_samples=return_samples)


EXAMPLE_ROWS = 8
"""Rows of the batch `mc_predict` builds its engine on."""


def _example_slice(x: Any) -> Any:
    """``x`` cut to its first `EXAMPLE_ROWS` rows (tensors whose dimension 0 is the batch; others as given)."""
    args = _as_args(x)
    if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
        return x
    rows = args[0].shape[0]
    cut = tuple(a[:EXAMPLE_ROWS] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == rows else a for a in args)
    return cut[0] if isinstance(x, Tensor) else type(x)(cut)
