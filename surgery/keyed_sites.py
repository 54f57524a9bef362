"""The keyed sites of the MC tail: every stochastic site draws from the counter hash of ``masks``.

- :class:`MaskContext`: the per-pass keys (one per row of the repeated batch) shared by the sites of a tail;
- :class:`HashMaskSite`: a dropout-family module replaced by its hash-mask form (train semantics, masks from
  ``masks.keep_factor``);
- :class:`KeyedRandom`: a ``TorchFunctionMode`` that routes torch's random draws and functional / attention
  dropout inside a site's own forward to the same hash, keyed per row;
- :class:`TrainModeSite`: a site without a hash form (DropBlock, DropConnect, FractalNet joins, other
  libraries' layers) run in train mode under ``KeyedRandom``.

A seeded MC request therefore reproduces row by row whatever else shares its batch (``docs/DESIGN.md`` §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.overrides import TorchFunctionMode

from .functional_sites import FUNCTIONAL_SPECS, FunctionalSpec
from .masks import (
    _C4,
    _C5,
    _M32,
    _mix32_int32_,
    _mixed_constant,
    _position_codes,
    _to_int32_bits,
    keep_factor,
    keep_product,
    mix32,
    quantised_p,
    site_keys,
)

__all__ = ["SITE_FORMS", "HashMaskSite", "KeyedRandom", "MaskContext", "TrainModeSite"]


class MaskContext:
    """Per-pass state shared by the hash-mask site modules of one MC tail.

    ``keys`` is the int64 tensor ``[N]`` of sample-row keys (`sample_keys`) of the rows the tail is about
    to process; the engine sets it before each tail pass (a plain attribute, so tracing for export sees
    it as a graph value). ``site_bits`` optionally maps a site index to its precomputed site keys ``[N]``
    (``site_keys(keys, site)`` as int32 bit patterns; ``dropwise.surgery.mc_layout``) so that a pass does
    not rehash them. ``exportable`` selects the int64 export path of `keep_mask`.
    """

    def __init__(self, exportable: bool = False) -> None:
        self.keys: Tensor | None = None
        self.site_bits: dict[int, Tensor] | None = None
        self.exportable = exportable

    def require_keys(self) -> Tensor:
        """The current keys; raises when a site runs outside an engine pass."""
        if self.keys is None:
            raise RuntimeError("hash-mask site called without keys: run it through MCEngine")
        return self.keys


# torch's SELU-preserving alpha dropout constant (-lambda * alpha of SELU), see Klambauer et al. 2017.
_ALPHA = 1.7580993408473766

SITE_FORMS: tuple[str, ...] = (
    "element",
    "classic",
    "channel",
    "embedding",
    "path",
    "path_classic",
    "alpha",
    "feature_alpha",
)
"""Forms a `HashMaskSite` can take (see its docstring)."""


class HashMaskSite(torch.nn.Module):
    """A dropout-family site made stochastic with counter-based masks (MC dropout, Gal & Ghahramani 2016).

    Always stochastic (it replaces a site inside an MC tail, whatever the ``training`` flag). With
    ``q = 1 - quantised_p(p)``, input ``x: [N, ...]`` (N = sample-rows, keys from the shared context):

    * ``element``: inverted dropout, ``x * m / q`` with one decision per element (``nn.Dropout``);
    * ``classic``: ``x * m`` without rescaling (Srivastava 2014, `ClassicDropout`);
    * ``channel``: ``x * m / q`` with one decision per (row, channel = dim 1), broadcast over the rest
      (``nn.Dropout1d/2d/3d``, matching torch's treatment of every input rank >= 3);
    * ``embedding``: ``[N, L, E]`` with one decision per (row, embedding dim) shared over L, ``/ q``;
    * ``path`` / ``path_classic``: one gate per row on a residual branch, ``/ q`` (timm) or not (Huang 2016;
      under MC each sample-row gets its own gate, the marginal of Huang's per-mini-batch gate);
    * ``alpha`` / ``feature_alpha``: torch's alpha dropout affine form ``a * (x*m + alpha' * (1 - m)) + b``
      (Klambauer et al. 2017) per element or per channel.
    """

    def __init__(self, context: MaskContext, site: int, p: float, form: str) -> None:
        super().__init__()
        if form not in SITE_FORMS:
            raise ValueError(f"unknown site form {form!r}; one of {SITE_FORMS}")
        self.context = context
        self.site = int(site)
        self.p = float(p)
        self.form = form
        self.q = 1.0 - quantised_p(self.p)
        self._pass_keys: Tensor | None = None
        self._pass_calls = 0

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.form in ("element", "classic", "alpha"):
            return tuple(x.shape[1:])
        if self.form in ("channel", "feature_alpha"):
            return (x.shape[1],) + (1,) * (x.dim() - 2)
        if self.form == "embedding":
            if x.dim() != 3:
                raise ValueError(f"embedding dropout expects [N, L, E], got {tuple(x.shape)}")
            return (1, x.shape[2])
        return (1,) * (x.dim() - 1)  # path gates

    def reset_pass(self) -> None:
        """Forget the last pass (its keys and call count): the compiled MC batch starts every pass from here."""
        self._pass_keys, self._pass_calls = None, 0

    def _site_code(self, keys: Tensor) -> int:
        """The site number keying this call: ``site`` for a pass's first call, a distinct code for each later
        call of the same module in the same pass (ViT calls one ``nn.Dropout`` twice per layer: without it
        both calls would draw the same mask)."""
        if keys is not self._pass_keys:
            self._pass_keys, self._pass_calls = keys, 0
        call = self._pass_calls
        self._pass_calls += 1
        return self.site if call == 0 else self.site + (call << 24)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the site's masked form to ``x`` (see class docstring)."""
        keys = self.context.require_keys()
        site = self._site_code(keys)
        table = None if self.context.exportable else self.context.site_bits
        bits = None if table is None else table.get(site)
        # One product with float factors (0 or the rescale): cheaper on the CPU than torch.where or a
        # product with a boolean mask.
        shape = self._mask_shape(x)
        exportable = self.context.exportable
        if self.form in ("alpha", "feature_alpha"):
            if self.q == 0.0:
                return torch.zeros_like(x)
            a = 1.0 / ((_ALPHA * _ALPHA * (1.0 - self.q) + 1.0) * self.q) ** 0.5
            b = _ALPHA * a * (1.0 - self.q)
            # a*(x*m + alpha'*(1-m)) + b with alpha' = -alpha  ==  m*(a*x + alpha*a) + (b - alpha*a)
            factors = keep_factor(keys, site, shape, self.p, 1.0, x.dtype, exportable=exportable, site_bits=bits)
            return (x * a + _ALPHA * a).mul_(factors).add_(b - _ALPHA * a)
        if self.q == 0.0:
            return x * 0.0
        scale = 1.0 if self.form in ("classic", "path_classic") else 1.0 / self.q
        if self.form in ("element", "classic"):
            return keep_product(x, keys, site, self.p, scale, exportable=exportable, site_bits=bits)
        return x * keep_factor(keys, site, shape, self.p, scale, x.dtype, exportable=exportable, site_bits=bits)

    def extra_repr(self) -> str:
        return f"site={self.site}, p={self.p}, form={self.form}"


def _uniform24(base: Tensor, n_positions: int) -> Tensor:
    """Uniforms ``[N, n_positions]`` on a 2**-24 grid: top 24 bits of ``mix(base ^ mix(w ^ C4))``.

    Eager: the in-place int32 hash of `keep_factor`'s fast path (bit-identical to the int64 one, a few
    times faster: `KeyedRandom` draws dominate a DropBlock tail); exporting or compiling: int64 `mix32`.
    """
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        positions = mix32(torch.arange(n_positions, dtype=torch.int64, device=base.device) ^ _C4)
        words = mix32(base.unsqueeze(1) ^ positions.unsqueeze(0))
        # (w >> 8) * 2**-24 == (w & ~0xff) * 2**-32 exactly; inductor's C++ backend fails to vectorise the
        # shift fused with the float conversion
        return (words & 0xFFFFFF00).to(torch.float32) * (1.0 / (1 << 32))
    codes = _position_codes(n_positions, base.device, True)
    words = _to_int32_bits(base).unsqueeze(1) ^ codes.unsqueeze(0)
    _mix32_int32_(words)
    words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # logical shift of the 32 bits
    return words.to(torch.float32).mul_(1.0 / (1 << 24))


class KeyedRandom(TorchFunctionMode):
    """Routes torch's random draws inside one site to the counter-based hash (for `TrainModeSite`).

    Intercepts ``Tensor.bernoulli_`` / ``torch.bernoulli`` (keep with probability p), ``torch.rand`` /
    ``torch.rand_like`` (uniform on a 2**-24 grid) and ``torch.randint``. Draw number ``c`` of the site's
    call gets key ``mix(site_key ^ mix(c ^ C5))``; a draw with a dimension equal to the number N of
    sample-rows (the first such) is keyed PER ROW along it (row n uses sample-row n's key: per-example layers
    such as DropConnect, DropBlock or FractalJoin's drop and survivor draws stay reproducible per row
    whatever shares the batch); any other draw uses one key from all N keys (reproducible for an identical
    batch) and is counted in ``shared_draws``. Each element gets its own 32-bit hash word; the uniform is its
    top 24 bits. ``generator`` arguments are ignored. Caveat: a layer whose per-example draws have some OTHER
    dimension of size N (N = T * B rows) would be keyed along that one.

    Functional dropout (``dropwise.surgery.functional_sites.FUNCTIONAL_SPECS``) is intercepted too: an active
    ``F.dropout*`` / ``torch.dropout`` / alpha dropout call is computed with keyed masks, an active
    ``scaled_dot_product_attention`` with ``dropout_p > 0`` by its reference math with a keyed mask on the
    attention weights, and the project's own functional forms run their body with their draws keyed. With
    ``functions`` given, only calls with those labels (``"dropout#0"``: function and ordinal among that
    function's active calls in this forward) are stochastic; the other active calls run in eval form.
    """

    def __init__(self, keys: Tensor, site: int, functions: frozenset[str] | None = None) -> None:
        super().__init__()
        self.keys = keys
        self.site_k = site_keys(keys, site)
        self.calls = 0
        self.shared_draws = 0
        self.functions = functions
        self._ordinals: dict[str, int] = {}

    def _uniform(self, shape: Sequence[int], device: torch.device) -> Tensor:
        code = _mixed_constant(self.calls, _C5)
        self.calls += 1
        shape = tuple(shape)  # sizes may be symbolic while exporting: no int() on them
        n_rows = self.keys.shape[0]
        row_dim = next((d for d, size in enumerate(shape) if guard_or_false(size == n_rows)), None)
        if row_dim is not None:
            base = mix32(self.site_k ^ code)
            inner = shape[:row_dim] + shape[row_dim + 1 :]
        else:
            self.shared_draws += 1
            base = mix32((self.site_k.sum(dim=0, keepdim=True) & _M32) ^ code)
            inner = shape
        n_positions = 1
        for size in inner:
            n_positions *= size
        u = _uniform24(base, n_positions)
        if row_dim is None:
            return u.reshape(shape).to(device)
        return u.reshape(n_rows, *inner).movedim(0, row_dim).to(device)

    def _keep(self, x: Tensor, channel: bool, p: float) -> Tensor:
        """Keyed {0, 1} keep mask for ``x`` (per element, or per (row, channel) when ``channel``)."""
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2) if channel and x.dim() > 2 else tuple(x.shape)
        return (self._uniform(shape, x.device) >= p).to(x.dtype)

    def _dropout(self, spec: FunctionalSpec, args: tuple, kwargs: dict) -> Tensor:
        x, p = args[0] if args else kwargs["input"], spec.p(args, kwargs)
        channel = "feature" in spec.name or spec.name[-2:] in ("1d", "2d", "3d")
        if "alpha" in spec.name:
            q = 1.0 - p
            if q == 0.0:
                return torch.zeros_like(x)
            a = 1.0 / ((_ALPHA * _ALPHA * p + 1.0) * q) ** 0.5
            b = _ALPHA * a * p
            return (x * a + _ALPHA * a) * self._keep(x, channel, p) + (b - _ALPHA * a)
        if p >= 1.0:
            return x * 0.0
        return x * self._keep(x, channel, p) * (1.0 / (1.0 - p))

    def _attention(self, args: tuple, kwargs: dict) -> Tensor:
        """``scaled_dot_product_attention`` by its reference math, the dropout mask keyed per row."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args, strict=False)) | kwargs
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, p = bound.get("attn_mask"), float(bound.get("dropout_p", 0.0))
        scale = bound.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if bound.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        scores = (q @ k.transpose(-2, -1)) * scale
        if bound.get("is_causal", False):
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p >= 1.0:
            weights = weights * 0.0
        elif p > 0.0:
            weights = weights * self._keep(weights, False, p) * (1.0 / (1.0 - p))
        return weights @ v

    def _functional(self, func: Any, spec: FunctionalSpec, args: tuple, kwargs: dict) -> Any:
        if not spec.active(args, kwargs):
            return func(*args, **kwargs)
        ordinal = self._ordinals.get(spec.name, 0)
        self._ordinals[spec.name] = ordinal + 1
        if self.functions is not None and f"{spec.name}#{ordinal}" not in self.functions:
            off_args, off_kwargs = spec.switched_off(args, kwargs)
            return func(*off_args, **off_kwargs)
        if spec.project:
            with self:  # the form's own body, its draws keyed (the undecorated body does not re-dispatch)
                return func.__wrapped__(*args, **kwargs)
        if spec.kind == "attention_dropout":
            return self._attention(args, kwargs)
        return self._dropout(spec, args, kwargs)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        spec = FUNCTIONAL_SPECS.get(func)
        if spec is not None:
            return self._functional(func, spec, args, kwargs)
        if func is Tensor.bernoulli_:
            target = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            u = self._uniform(target.shape, target.device)
            return target.copy_(u < p)  # in place, as bernoulli_ is: callers may ignore the return value
        if func is torch.bernoulli:
            probs = args[0]
            u = self._uniform(probs.shape, probs.device)
            return (u < probs).to(probs.dtype)
        if func is torch.rand_like:
            like = args[0]
            return self._uniform(like.shape, like.device).to(kwargs.get("dtype") or like.dtype)
        if func is torch.rand:
            size = args[0] if len(args) == 1 and isinstance(args[0], Sequence) else args
            u = self._uniform(size, kwargs.get("device") or self.keys.device)
            return u.to(kwargs.get("dtype") or torch.get_default_dtype())
        if func is torch.randint:
            low, high = (0, args[0]) if len(args) == 2 else (args[0], args[1])
            size = args[-1]
            u = self._uniform(size, kwargs.get("device") or self.keys.device)
            return (u * (high - low)).floor().to(torch.int64) + low
        return func(*args, **kwargs)


def _row_local_layers() -> tuple[type, ...]:
    """Layers whose train-mode forward treats rows independently apart from its random draws."""
    try:
        from dropwise.models.layers import DropBlock2d, DropConnectConv2d, DropConnectLinear, FractalJoin
    except ImportError:  # surgery used without the models package: no layer is known to be row-local
        return ()
    return (DropBlock2d, DropConnectConv2d, DropConnectLinear, FractalJoin)


class TrainModeSite(torch.nn.Module):
    """Wraps a site with no hash-mask form (DropBlock, DropConnect, FractalJoin, a functional site's gate).

    Runs the wrapped module's own forward with ITS OWN ``training`` flag set (children keep theirs, so a
    BatchNorm inside stays in eval) and its random draws routed to the counter-based hash by
    `KeyedRandom`: the layer's own sampling logic (DropBlock's valid-region seeds, DropConnect's
    per-example weight masks, FractalJoin's survivor rule) with hash-based draws. A ``dropwise.models.layers``
    ``DropBlock2d`` runs with ``normalize="sample"`` (its rescale counted per sample instead of over the
    whole batch; both preserve the expectation), so its rows do not depend on each other.

    A functional site's gating module (``F.dropout(h, p, self.training)``, attention dropout) is wrapped
    whole: its own flag is set for the pass (children keep theirs, so nested module sites are replaced
    separately) and `KeyedRandom` computes its dropout calls with keyed masks (``functions``: the labels of
    the chosen calls; None = all).

    ``rows_independent``: whether a seeded row's output can depend only on that row (its seed, row index
    and sample), never on the rest of the batch. True when every draw seen so far was keyed per row AND the
    wrapped module is a ``dropwise.models.layers`` DropBlock2d, DropConnect layer or FractalJoin, or the
    gating module of functional sites (its train-mode forward is taken to treat rows apart, as attention
    and MLP blocks do; the engine's probe pass and the tests check it on transformers models). A
    ``per_example=False`` DropConnect mask, or a DropConnect over a ``[B, L, F]`` input, draws one mask for
    the whole batch. Other modules (timm / torchvision DropBlock, which rescale over the whole batch,
    user-registered kinds) are False. Meaningful once a pass has run (the engine runs one).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        context: MaskContext,
        site: int,
        *,
        functional: bool = False,
        functions: frozenset[str] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.context = context
        self.site = int(site)
        self.functional = bool(functional)
        self.functions = functions
        layers = _row_local_layers()
        self._row_local = self.functional or isinstance(module, layers)
        self._per_sample_norm = bool(layers) and isinstance(module, layers[0])
        self.shared_draws = 0
        self._pass_keys: Tensor | None = None
        self._pass_calls = 0

    def reset_pass(self) -> None:
        """Forget the last pass (its keys and call count): the compiled MC batch starts every pass from here."""
        self._pass_keys, self._pass_calls = None, 0

    @property
    def rows_independent(self) -> bool:
        """See the class docstring."""
        return self._row_local and self.shared_draws == 0

    def forward(self, *args: object, **kwargs: object) -> object:
        """Run the wrapped module stochastically with keyed draws."""
        module: Any = self.module
        module.training = True
        if self._per_sample_norm:
            saved = getattr(module, "normalize", "batch")
            module.normalize = "sample"
        try:
            keys = self.context.require_keys()
            if keys is not self._pass_keys:  # a later call in the same pass draws under a distinct site code
                self._pass_keys, self._pass_calls = keys, 0
            site = self.site if self._pass_calls == 0 else self.site + (self._pass_calls << 24)
            self._pass_calls += 1
            random = KeyedRandom(keys, site, self.functions)
            with random:
                out = self.module(*args, **kwargs)
            if not torch.compiler.is_compiling():  # counted by eager passes (the engine's probe); a count that
                self.shared_draws += random.shared_draws  # changed per compiled call would recompile every call
            return out
        finally:
            module.training = False
            if self._per_sample_norm:
                module.normalize = saved
