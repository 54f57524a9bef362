"""The fast MC-dropout engine: trunk once, tail for all T samples in one batched pass, hash masks.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation") averages T stochastic forward
passes. Only the layers from the first stochastic site on differ between passes, so the engine

1. splits the model (``dropwise.surgery.split``) before its first CHOSEN site: a deterministic trunk and a tail;
2. runs the trunk once per request (eval mode, no autograd);
3. repeats the tail's inputs T times (sample-major rows ``n = t * B + b``) and runs the tail once for all
   samples, in chunks of at most ``chunk_rows`` rows (cache-sized by default, within a memory budget);
4. replaces every chosen site of the tail by its hash-mask form (`dropwise.surgery.keyed_sites.HashMaskSite`): masks
   from a counter-based hash of (request seed, row within request, sample, site, position), far cheaper
   than ``F.dropout``'s per-element Bernoulli draw and reproducible per row whatever else is in the batch.
   Sites with no hash form (DropBlock, DropConnect, FractalJoin, functional and attention dropout inside a
   module's forward) run their own train-mode forward (`dropwise.surgery.keyed_sites.TrainModeSite`) with torch's random
   draws and dropout calls routed to the same hash (`dropwise.surgery.keyed_sites.KeyedRandom`): per-example draws
   stay keyed per row, ``F.dropout`` / ``scaled_dot_product_attention(dropout_p=...)`` get keyed masks, and
   ``dropwise.models.layers.DropBlock2d`` rescales per sample (``normalize="sample"``) instead of over the
   whole batch. A gate that is also the parent of a module site (BERT's sdpa attention) is wrapped after its
   child is replaced. ``rows_independent`` says whether every site keeps rows apart; a draw shared by the
   whole batch (e.g. one DropConnect mask for all rows) or another library's DropBlock (batch-wide rescale)
   reproduces only for an identical batch; a module called twice in one pass draws a fresh mask each call;
5. summarises the per-sample outputs ``[T, B, K]`` (``dropwise.surgery.summaries``, docs/DESIGN.md §3).

With ``compile=True`` (or ``"reduce-overhead"``: CUDA graphs on CUDA) steps 3-5 of each group of requests
run as one ``torch.compile``'d function (`dropwise.surgery.compiled_batch`): masks, tail and summaries fused
into a few kernels, the same masks, results equal to the eager engine's up to float rounding.

Sites that are not chosen behave as in eval mode (``sites="last"`` is TorchUncertainty's ``last_layer``:
the longest shared trunk). BatchNorm always uses its running statistics and is never updated. The engine
works on its own deep copy of the model: rebuild it after changing the weights.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .compiled_batch import CompiledBatch, compile_mode, group_blocks
from .export_split import FunctionalCallSite
from .functional_sites import trace_calls
from .keyed_sites import HashMaskSite, MaskContext, TrainModeSite
from .mc_layout import Group, Plan, plan
from .module_tools import set_training
from .outputs import SAMPLE_LOGITS, SAMPLES, summary_names
from .site_types import Site
from .sites import find_sites, gating_modules
from .split import SplitModel, split
from .summaries import classification_summaries, regression_summaries

log = logging.getLogger(__name__)

__all__ = ["MCEngine", "MCResult", "choose_sites", "default_chunk_rows", "mc_predict"]

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

    Classification fills ``probabilities`` (the predictive mean, formerly ``mean_probs``: still readable
    under that name), ``predictive_entropy``, ``expected_entropy``, ``mutual_information``,
    ``variation_ratio`` and ``std`` (per class); regression fills ``mean`` and ``std``. When asked for,
    ``samples`` holds the per-sample outputs ``[T, B, K]``: PROBABILITIES ``softmax(z_t)`` for
    classification (with the raw logits in ``sample_logits``), values for regression. ``num_samples`` is
    T. ``seed`` is the seed the masks were drawn from (pass it back to reproduce the result).
    """

    task: str
    num_samples: int
    seed: int
    std: Tensor
    probabilities: Tensor | None = None
    predictive_entropy: Tensor | None = None
    expected_entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    variation_ratio: Tensor | None = None
    mean: Tensor | None = None
    samples: Tensor | None = None
    sample_logits: Tensor | None = None

    @property
    def mean_probs(self) -> Tensor | None:
        """Deprecated spelling of `probabilities`."""
        return self.probabilities

    @property
    def n_samples(self) -> int:
        """Deprecated spelling of `num_samples` (T)."""
        return self.num_samples

    def as_dict(self) -> dict[str, Tensor]:
        """The non-empty tensors by their output-table names (`dropwise.surgery.outputs`)."""
        names = (*summary_names(self.task), SAMPLES, SAMPLE_LOGITS)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _as_args(x: Any) -> tuple[Tensor, ...]:
    if isinstance(x, tuple | list):
        return tuple(x)
    return (x,)


def _execution_order(model: nn.Module, example_input: Any, sites: Sequence[Site]) -> list[Site]:
    """Sites sorted by when they first act on ``example_input`` (unreached ones last).

    Module sites count from the start of their module, functional sites from the call itself (a dropout in
    the root's own forward after every block comes last), on a copy with every gating module in train mode.
    """
    work = copy.deepcopy(model)
    set_training(work, False)
    for name in gating_modules(list(sites)):
        work.get_submodule(name).training = True
    events: list[str] = []
    with torch.random.fork_rng(devices=[]):
        trace_calls(work, example_input, {s.name for s in sites if s.function is None}, events)
    order: dict[str, int] = {}
    for event in events:
        order.setdefault(event, len(order))
    return sorted(sites, key=lambda s: order.get(s.key, len(order)))


def choose_sites(found: Sequence[Site], sites: str | Sequence[str | Site] | None) -> list[Site]:
    """The chosen subset of ``found`` (execution order): None/"all", "last", "first", or names/keys/Sites."""
    if sites is None or sites == "all":
        return list(found)
    ran = [s for s in found if s.called is not False] or list(found)  # never a site that did not run
    if sites == "last":
        return [ran[-1]]
    if sites == "first":
        return [ran[0]]
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


def _replacement(
    sites: Sequence[Site], module: nn.Module, index: int, found: Sequence[Site], context: MaskContext
) -> nn.Module:
    """The MC form of the chosen sites acting through ``module``: a hash-mask site, else a train-mode wrapper.

    A module site with a hash form becomes a `HashMaskSite`; any other module site, and the gating module of
    functional sites (wrapped once for all its chosen calls), a `TrainModeSite` keyed by site ``index``.
    """
    functional = [s for s in sites if s.function is not None]
    if functional:
        names = {s.function for s in functional if s.function}
        every = {s.function for s in found if s.name == functional[0].name and s.function}
        # a FunctionalCallSite (export front-end) is one call: all of it is chosen
        only = None if names == every or isinstance(module, FunctionalCallSite) else frozenset(names)
        return TrainModeSite(module, context, index, functional=True, functions=only)
    site = sites[0]
    form = _FORMS.get(site.kind)
    if site.kind == "drop_path":
        form = "path" if getattr(module, "scale_by_keep", True) else "path_classic"
    if form is None:
        return TrainModeSite(module, context, index)
    return HashMaskSite(context, index, float(site.p), form)


def _rewrite_tail(
    tail: nn.Module,
    model: nn.Module,
    found: Sequence[Site],
    chosen: Sequence[Site],
    context: MaskContext,
    site_modules: dict[str, nn.Module] | None = None,
) -> list[nn.Module]:
    """Replace each chosen site (module site, or the gate of functional sites) inside ``tail`` by its MC form.

    Sites act through a module found by identity in ``tail``: the site module, the gating module, or the
    module the split put in their place (``site_modules``, by site key). Deepest modules are replaced first,
    so a gate that is also the parent of a module site (BERT's sdpa attention) keeps its replaced child.
    """
    in_tail: dict[int, list[str]] = {}
    for name, module in tail.named_modules(remove_duplicate=False):
        in_tail.setdefault(id(module), []).append(name)
    index = {s.key: i for i, s in enumerate(found)}
    groups: dict[int, tuple[nn.Module, list[Site]]] = {}
    for site in chosen:
        if site_modules is not None and site.key in site_modules:
            module = site_modules[site.key]
        else:
            module = model.get_submodule(site.name) if site.name else model
        groups.setdefault(id(module), (module, []))[1].append(site)

    def depth(module: nn.Module) -> int:
        return max((name.count(".") + 1 if name else 0 for name in in_tail.get(id(module), [])), default=0)

    replaced: list[nn.Module] = []
    for module, sites in sorted(groups.values(), key=lambda g: -depth(g[0])):
        names = in_tail.get(id(module), [])
        if not names:
            continue  # the site lies in the trunk: impossible for the split's own sites, kept for safety
        replacement = _replacement(sites, module, index[sites[0].key], found, context)
        for name in names:
            if name == "":
                raise ValueError("the root module itself is a site: wrap it in a container first")
            _set_submodule(tail, name, replacement)
        replaced.append(replacement)
    return replaced


def primary_output(out: Any) -> Tensor:
    """The tensor MC summarises: ``out`` itself, ``logits`` of a dict-like output (Hugging Face ``ModelOutput``),
    else its first tensor value, or the first element of a tuple / list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        values = list(out.values())
    elif isinstance(out, tuple | list):
        values = list(out)
    else:
        raise TypeError(f"the model returned {type(out).__name__}; MC needs a tensor (or a dict / tuple of them)")
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"the model returned {type(out).__name__} with no tensor in it")


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


def _fresh_seeds(n: int) -> list[int]:
    """``n`` fresh seeds from torch's global generator (one draw for all)."""
    return torch.randint(0, 1 << 62, (n,)).tolist() if n else []


def _chunk_rows_for(per_row: int, device: torch.device, memory_budget: int, chunk_bytes: int) -> int:
    """Sample-rows per tail pass: cache-sized on the CPU, one pass bounded by memory on an accelerator."""
    budget_rows = max(1, memory_budget // (4 * per_row))
    if device.type == "cpu":
        return min(max(128, chunk_bytes // per_row), budget_rows)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        budget_rows = max(budget_rows, free // (4 * 4 * per_row))  # a quarter of the free memory
    return budget_rows


def default_chunk_rows(
    model: nn.Module,
    example_input: Any,
    *,
    device: torch.device | str | None = None,
    memory_budget: int = 256 << 20,
    chunk_bytes: int = 1 << 20,
) -> int:
    """The `MCEngine` default ``chunk_rows`` of ``model`` on ``device`` (default: the model's).

    CPU: rows whose largest activation fills about ``chunk_bytes`` (cache-sized chunks were measured faster
    than one big pass), at least 128, within ``memory_budget``. Other devices: as many rows as the budget
    allows (on CUDA the larger of ``memory_budget`` and a quarter of the free memory), so a batch is one
    pass: fewer, larger kernels instead of a launch-bound loop of chunks. The per-row size is the largest
    activation of any module on ``example_input``, times 4 for the activations alive at once.
    """
    if device is None:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
    per_row = _bytes_per_row(model, _as_args(example_input))
    return _chunk_rows_for(per_row, torch.device(device), memory_budget, chunk_bytes)


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
        chunk_rows: most sample-rows per tail pass. Default (`default_chunk_rows`): on the CPU rows whose
            largest activation fills about ``chunk_bytes`` (1 MiB: cache-sized chunks measured faster than
            one big pass), at least 128 rows, never more than ``memory_budget`` (bytes) allows; on a GPU one
            pass bounded by memory.
        compile: ``False`` (eager), ``True`` / ``"default"`` or ``"reduce-overhead"``: run tail, masks and
            summaries of each group of requests as one ``torch.compile``'d function
            (`dropwise.surgery.compiled_batch`; ``"reduce-overhead"`` adds CUDA graphs on CUDA). The first
            call of each new shape class compiles (seconds to a minute); later batch sizes and T reuse it.
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
        compile: bool | str = False,
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
        if chunk_rows is None:  # measured before the rewrite: the tail shares its modules with the model
            per_row = _bytes_per_row(self.model, example)
            chunk_rows = _chunk_rows_for(per_row, self._device(), memory_budget, chunk_bytes)
        self.replaced = _rewrite_tail(
            self.tail, self.model, self.sites, self.chosen, self.context, self.split.site_modules
        )
        self._batched = _batched_outputs(self.trunk, example)
        self.chunk_rows = int(chunk_rows)
        self._mask_sites = [m.site for m in self.replaced if isinstance(m, HashMaskSite)]
        self.channels_last = self._device().type == "cpu" if channels_last is None else bool(channels_last)
        self.compile = compile_mode(compile)
        if exportable and self.compile != "off":
            raise ValueError("an exportable engine cannot be compiled: export traces the eager tail")
        self._compiled: CompiledBatch | None = None
        self.compile_error: str | None = None  #: why a requested compile fell back to the eager engine
        if self.compile != "off":
            self._compiled = CompiledBatch(
                self._primary_tail,
                self.context,
                self.replaced,
                self._mask_sites,
                self._batched,
                task,
                channels_last=self.channels_last,
                mode=self.compile,
                device=self._device(),
            )
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

        True when every chosen site is a hash-mask site or a `keyed_sites.TrainModeSite` whose
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

        Requests with the same T form one group laid out sample-major over all the group's rows
        (``dropwise.surgery.mc_layout``); the key of a row depends only on (seed_r, row index within request
        r, t), so the layout never changes a seeded answer.
        """
        layout = plan(rows_per_request, samples_per_request, seeds)
        device = self._device()
        return torch.from_numpy(layout.index).to(device), torch.from_numpy(layout.keys).to(device)

    def _primary_tail(self, *args: Tensor) -> Tensor:
        """The tail's output that MC summarises (see `primary_output`)."""
        return primary_output(self.tail(*args))

    def _device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    @torch.inference_mode()
    def tail_outputs(
        self,
        live: Sequence[Tensor],
        index: Tensor,
        keys: Tensor,
        site_bits: dict[int, Tensor] | None = None,
        *,
        check: Callable[[], None] | None = None,
    ) -> Tensor:
        """Run the tail on trunk rows ``index`` with mask keys ``keys``, chunked; outputs ``[M, ...]``.

        ``site_bits``: precomputed site keys ``[M]`` per hash-mask site (see `keyed_sites.MaskContext`).
        ``check`` is called before every chunk; an exception it raises abandons the computation (a server
        uses it to stop work whose deadline has passed).
        """
        outputs = []
        total = int(index.shape[0])
        for start in range(0, total, self.chunk_rows):
            if check is not None:
                check()
            stop = min(start + self.chunk_rows, total)
            whole = start == 0 and stop == total  # one pass: no slicing
            idx = index if whole else index[start:stop]
            self.context.keys = keys if whole else keys[start:stop]
            if site_bits is not None:
                self.context.site_bits = site_bits if whole else {k: v[start:stop] for k, v in site_bits.items()}
            args = [t.index_select(0, idx) if batched else t for t, batched in zip(live, self._batched, strict=True)]
            if self.channels_last:
                args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
            try:
                outputs.append(self._primary_tail(*args))
            finally:
                self.context.keys = None
                self.context.site_bits = None
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.inference_mode()
    def run_batch(
        self,
        x: Any,
        rows_per_request: Sequence[int],
        samples_per_request: Sequence[int],
        seeds: Sequence[int | None],
        return_samples: bool = False,
        *,
        to_host: bool = False,
        check: Callable[[], None] | None = None,
    ) -> list[MCResult]:
        """Several requests batched along dimension 0 of ``x``, each with its own T and seed.

        The trunk runs once for all rows; the tail runs once (chunked) for all ``sum_r T_r * B_r``
        sample-rows; requests with the same T are summarised together (one call per distinct T). A ``None``
        seed draws a fresh one from torch's global generator (reported in the result). ``to_host``: return
        CPU tensors, fetched from the device with one copy for the whole batch. ``check`` is called before
        each tail chunk (see `tail_outputs`). Returns one `MCResult` per
        request, in order.
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
        fresh = iter(_fresh_seeds(sum(s is None for s in seeds)))
        resolved = [next(fresh) if s is None else int(s) for s in seeds]
        for s in resolved:
            if not 0 <= s < _MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63), got {s}")
        self.trunk.eval()
        self.tail.eval()
        live = self.trunk(*args)
        layout = plan(rows, samples, resolved, self._mask_sites)
        summaries = None
        if self._compiled is not None:
            try:
                summaries = [self._compiled_group(live, layout, g, return_samples, check) for g in layout.groups]
            except torch._dynamo.exc.TorchDynamoException as exc:  # a graph torch.compile cannot build
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                log.warning("MC engine: torch.compile failed (%s); this engine runs eagerly", self.compile_error)
                self._compiled = None
        if summaries is None:
            device = self._device()
            index = torch.from_numpy(layout.index).to(device)
            keys = torch.from_numpy(layout.keys).to(device)
            bits = {site: torch.from_numpy(b).to(device) for site, b in layout.site_bits.items()}
            out = self.tail_outputs(live, index, keys, bits, check=check)
            summaries = [
                self._summarise(
                    out[g.start : g.start + g.samples * g.rows].reshape(g.samples, g.rows, -1), 0, return_samples
                )
                for g in layout.groups
            ]
        if to_host:
            summaries = _to_host(summaries)
        results: list[MCResult | None] = [None] * len(rows)
        for group, summary in zip(layout.groups, summaries, strict=True):
            for r, offset in zip(group.requests, group.row_offsets, strict=True):
                results[r] = _rows_of(summary, offset, rows[r], resolved[r])
        return [r for r in results if r is not None]

    def _compiled_group(
        self,
        live: Sequence[Tensor],
        layout: Plan,
        group: Group,
        return_samples: bool,
        check: Callable[[], None] | None,
    ) -> MCResult:
        """One group's summaries through the compiled batch, in column chunks of at most ``chunk_rows``."""
        assert self._compiled is not None
        names = list(summary_names(self.task))
        if return_samples:
            names += [SAMPLES, SAMPLE_LOGITS] if self.task == "classification" else [SAMPLES]
        pieces: list[list[Tensor]] = []
        device = self._device()
        for real, block in group_blocks(layout, group, self._mask_sites, self.chunk_rows):
            if check is not None:
                check()
            out = self._compiled(live, torch.from_numpy(block).to(device), return_samples)
            pieces.append(
                [t[:, :real] if n in (SAMPLES, SAMPLE_LOGITS) else t[:real] for n, t in zip(names, out, strict=True)]
            )
        fields = {
            n: pieces[0][i]
            if len(pieces) == 1
            else torch.cat([p[i] for p in pieces], dim=int(n in (SAMPLES, SAMPLE_LOGITS)))
            for i, n in enumerate(names)
        }
        std = fields.pop("std")
        return MCResult(self.task, group.samples, 0, std, **fields)

    def _summarise(self, per_sample: Tensor, seed: int, return_samples: bool) -> MCResult:
        if self.task == "classification":
            s = classification_summaries(per_sample)
            return MCResult(
                "classification",
                per_sample.shape[0],
                seed,
                s.std,
                probabilities=s.probabilities,
                predictive_entropy=s.predictive_entropy,
                expected_entropy=s.expected_entropy,
                mutual_information=s.mutual_information,
                variation_ratio=s.variation_ratio,
                samples=torch.softmax(per_sample.float(), dim=-1) if return_samples else None,
                sample_logits=per_sample if return_samples else None,
            )
        r = regression_summaries(per_sample)
        kept = per_sample if return_samples else None
        return MCResult("regression", per_sample.shape[0], seed, r.std, mean=r.mean, samples=kept)


def _rows_of(summary: MCResult, start: int, n_rows: int, seed: int) -> MCResult:
    """Rows ``start .. start + n_rows - 1`` of a group's summaries (views), as one request's result."""
    fields = {}
    for name, value in summary.as_dict().items():
        per_sample = name in (SAMPLES, SAMPLE_LOGITS)  # [T, B, K]: rows on dim 1
        fields[name] = value[:, start : start + n_rows] if per_sample else value[start : start + n_rows]
    std = fields.pop("std")
    return MCResult(summary.task, summary.num_samples, seed, std, **fields)


def _to_host(summaries: list[MCResult]) -> list[MCResult]:
    """The summaries on the CPU, fetched with one device-to-host copy for all of them."""
    if all(t.device.type == "cpu" for summary in summaries for t in summary.as_dict().values()):
        return summaries
    return _moved(summaries, lambda flat: flat.cpu())


def _moved(summaries: list[MCResult], move: Any) -> list[MCResult]:
    """``summaries`` with every tensor packed into one flat tensor, moved by ``move`` once, and unpacked."""
    tensors = [t for summary in summaries for t in summary.as_dict().values()]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    flat = move(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    hosted = []
    offset = 0
    for summary in summaries:
        host = {}
        for name, value in summary.as_dict().items():
            host[name] = flat[offset : offset + value.numel()].reshape(value.shape).to(value.dtype)
            offset += value.numel()
        std = host.pop("std")
        hosted.append(MCResult(summary.task, summary.num_samples, summary.seed, std, **host))
    return hosted


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
