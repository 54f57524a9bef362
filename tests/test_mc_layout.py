"""The host-side MC layout: keys bit-identical to the torch key schedule, groups by T, chunk policy."""

from __future__ import annotations

import torch
from dropwise.surgery.engine import MCEngine, default_chunk_rows
from dropwise.surgery.masks import _to_int32_bits, row_keys, sample_keys, site_keys
from dropwise.surgery.mc_layout import plan
from torch import nn


def test_plan_keys_equal_the_torch_key_schedule() -> None:
    rows, samples = [3, 1, 2, 4], [4, 7, 4, 1]
    seeds = [0, (1 << 63) - 1, 12345678901234, 5]
    layout = plan(rows, samples, seeds, sites=[0, 3])
    assert [g.samples for g in layout.groups] == [4, 7, 1]
    assert [g.requests for g in layout.groups] == [(0, 2), (1,), (3,)]
    first = [0, 3, 4, 6]
    index, keys = torch.from_numpy(layout.index), torch.from_numpy(layout.keys)
    for group in layout.groups:
        block_i = index[group.start : group.start + group.samples * group.rows].reshape(group.samples, group.rows)
        block_k = keys[group.start : group.start + group.samples * group.rows].reshape(group.samples, group.rows)
        for r, offset in zip(group.requests, group.row_offsets, strict=True):
            local = torch.arange(rows[r])
            expected = sample_keys(row_keys(torch.full((rows[r],), seeds[r]), local), samples[r])
            got = block_k[:, offset : offset + rows[r]].reshape(-1)
            assert torch.equal(got, expected)
            assert torch.equal(block_i[:, offset : offset + rows[r]], (local + first[r]).expand(samples[r], -1))
    for site in (0, 3):
        assert torch.equal(torch.from_numpy(layout.site_bits[site]), _to_int32_bits(site_keys(keys, site)))


def test_mixed_t_batch_equals_requests_alone_and_host_copy_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.4), nn.Linear(32, 32), nn.Dropout(0.2))
    model = nn.Sequential(model, nn.Linear(32, 3)).eval()
    x = torch.randn(7, 6)
    engine = MCEngine(model, x)
    rows, samples, seeds = [2, 3, 1, 1], [8, 5, 8, 5], [4, 9, 16, 25]
    batched = engine.run_batch(x, rows, samples, seeds, return_samples=True, to_host=True)
    start = 0
    for result, n, t, seed in zip(batched, rows, samples, seeds, strict=True):
        alone = engine(x[start : start + n], samples=t, seed=seed, return_samples=True)
        start += n
        assert result.seed == seed and result.num_samples == t
        torch.testing.assert_close(result.samples, alone.samples, rtol=1e-5, atol=1e-6)
        for name, value in alone.as_dict().items():
            torch.testing.assert_close(result.as_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_unseeded_requests_get_distinct_reported_seeds() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    results = MCEngine(model, x).run_batch(x, [1, 1, 1], [4, 4, 4], [None, 7, None])
    assert results[1].seed == 7
    assert len({r.seed for r in results}) == 3


def test_chunk_policy_cpu_cache_sized_gpu_one_pass() -> None:
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10)).eval()
    x = torch.randn(8, 64)
    cpu = default_chunk_rows(model, x, device="cpu")
    gpu = default_chunk_rows(model, x, device="cuda")  # no GPU needed: without one the budget alone decides
    assert cpu == max(128, (1 << 20) // 4096)
    assert gpu >= (256 << 20) // (4 * 4096) >= 64 * 32  # a GPU adds a quarter of its free memory
    assert MCEngine(model, x, chunk_rows=gpu).chunk_rows == gpu


def test_one_copy_packing_restores_every_summary() -> None:
    from dropwise.surgery.engine import _moved

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    engine = MCEngine(model, x)
    groups = [engine(x[:2], samples=4, seed=1, return_samples=True), engine(x[2:], samples=6, seed=2)]
    moves: list[int] = []

    def move(flat: torch.Tensor) -> torch.Tensor:
        moves.append(flat.numel())
        return flat.clone()

    restored = _moved(groups, move)
    assert len(moves) == 1
    for before, after in zip(groups, restored, strict=True):
        assert after.seed == before.seed and after.num_samples == before.num_samples
        assert before.as_dict().keys() == after.as_dict().keys()
        for name, value in before.as_dict().items():
            assert torch.equal(after.as_dict()[name], value) and after.as_dict()[name].dtype == value.dtype
