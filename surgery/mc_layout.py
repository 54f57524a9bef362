"""Where each MC sample-row of a batch of requests goes: trunk row, mask keys and summary groups, on the host.

The MC engine (``dropwise.surgery.engine``) runs the tail once for ``sum_r T_r * B_r`` sample-rows. This
module plans that pass for a batch of requests (rows ``B_r``, samples ``T_r``, seed ``s_r``) in a few
vectorised numpy operations, so that the plan costs the device one host-to-device copy instead of a few
dozen small kernels per request (on a GPU each kernel is a launch):

* requests with the same T form one GROUP; a group's sample-rows are laid out sample-major over all its
  rows (``n = t * R_g + j``, j = row within the group), so the group's per-sample outputs are one
  ``[T, R_g, K]`` block that is summarised in one call and split by request afterwards;
* the mask key of a sample-row is the counter-based key of `dropwise.surgery.masks` (request seed, row
  WITHIN its request, sample), bit for bit the value of ``masks.sample_keys(masks.row_keys(...))``
  (tested), so the layout never changes a seeded answer;
* the site keys (``masks.site_keys``) of the hash-mask sites are precomputed too, as int32 bit patterns.

uint32 numpy arithmetic wraps modulo 2**32, which is the hash's arithmetic (Wellons' ``lowbias32``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .masks import _C0, _C1, _C2, _C3, _M32, _mixed_constant

__all__ = ["Group", "Plan", "mix32_np", "plan"]

_MUL1 = np.uint32(0x7FEB352D)
_MUL2 = np.uint32(0x846CA68B)


def mix32_np(h: np.ndarray) -> np.ndarray:
    """``lowbias32`` of a uint32 array (a new array)."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= _MUL1
    h ^= h >> np.uint32(15)
    h *= _MUL2
    h ^= h >> np.uint32(16)
    return h


@dataclass(frozen=True)
class Group:
    """Requests sharing one T: their sample-rows are ``[start, start + samples * rows)`` of the tail."""

    samples: int
    requests: tuple[int, ...]  # request indices, in batch order
    row_offsets: tuple[int, ...]  # first row of each request within the group (columns of the block)
    rows: int  # R_g: rows of all its requests
    start: int  # first sample-row of the group in the tail


@dataclass(frozen=True)
class Plan:
    """The tail pass of one batch: ``index`` [M] trunk row per sample-row, ``keys`` [M] (uint32 values in
    int64), ``site_bits`` {site: int32 [M]} and the summary groups."""

    index: np.ndarray
    keys: np.ndarray
    site_bits: dict[int, np.ndarray]
    groups: tuple[Group, ...]


def _seed_keys(seeds: np.ndarray) -> np.ndarray:
    """``masks.seed_keys`` of uint64 seeds: mix(mix(lo ^ C0) ^ hi)."""
    lo = (seeds & np.uint64(_M32)).astype(np.uint32)
    hi = (seeds >> np.uint64(32)).astype(np.uint32)
    return mix32_np(mix32_np(lo ^ np.uint32(_C0)) ^ hi)


def plan(rows: Sequence[int], samples: Sequence[int], seeds: Sequence[int], sites: Sequence[int] = ()) -> Plan:
    """The layout of requests with ``rows[r]`` rows, ``samples[r]`` samples and seed ``seeds[r]``.

    ``sites``: indices of the hash-mask sites whose site keys to precompute.
    """
    rows_a = np.asarray(rows, dtype=np.int64)
    first_row = np.concatenate(([0], np.cumsum(rows_a)[:-1]))
    seed_k = _seed_keys(np.asarray([int(s) for s in seeds], dtype=np.uint64))
    by_t: dict[int, list[int]] = {}
    for r, t in enumerate(samples):
        by_t.setdefault(int(t), []).append(r)
    index_parts, key_parts, groups = [], [], []
    start = 0
    for t, requests in by_t.items():
        req = np.asarray(requests, dtype=np.int64)
        counts = rows_a[req]
        total = int(counts.sum())
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
        owner = np.repeat(np.arange(len(req)), counts)  # request (within the group) of each group row
        local = np.arange(total, dtype=np.int64) - offsets[owner]  # row within its request
        trunk_row = first_row[req][owner] + local
        row_k = mix32_np(seed_k[req][owner] ^ mix32_np(local.astype(np.uint32) ^ np.uint32(_C1)))
        codes = mix32_np(np.arange(t, dtype=np.uint32) ^ np.uint32(_C2))
        key_parts.append(mix32_np(row_k[None, :] ^ codes[:, None]).reshape(-1))
        index_parts.append(np.tile(trunk_row, t))
        groups.append(Group(t, tuple(requests), tuple(int(o) for o in offsets), total, start))
        start += t * total
    keys = np.concatenate(key_parts)
    site_bits = {int(s): mix32_np(keys ^ np.uint32(_mixed_constant(int(s), _C3))).view(np.int32) for s in sites}
    return Plan(np.concatenate(index_parts), keys.astype(np.int64), site_bits, tuple(groups))
