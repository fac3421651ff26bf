"""The KV-outer work list's set semantics (msa_jax/kv_outer/worklist.py), on any machine.

A row of block_indices is a set: a slot repeating an earlier slot's id is dropped. Short rows
find repeats by comparing slot pairs, long ones (dense mode's every-block rows) by sorting;
both are checked against a loop, and a whole work list built each way must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from msa_jax.kv_outer import worklist


def _loop_repeats(bi):
    bi = np.asarray(bi)
    want = np.zeros(bi.shape, bool)
    for idx in np.ndindex(bi.shape[:-1]):
        seen = set()
        for j, x in enumerate(bi[idx]):
            want[idx + (j,)] = x in seen
            seen.add(x)
    return want


@pytest.mark.parametrize("K", [1, 8, 32, 33, 64, 300])
def test_repeats_match_a_loop(K):
    r = np.random.default_rng(K)
    bi = r.integers(-2, max(2, K // 2), size=(2, 5, 3, K)).astype(np.int32)  # many repeats, -1, -2
    got = np.asarray(worklist.repeats_an_earlier_slot(jnp.asarray(bi)))
    np.testing.assert_array_equal(got, _loop_repeats(bi))
    assert got.any() or K == 1


def test_long_rows_build_the_same_work_list_both_ways(monkeypatch):
    B, T, Hkv, S, bk = 2, 200, 2, 4000, 64
    r = np.random.default_rng(0)
    n = S // bk  # 63 blocks: sorted repeat search
    bi = jnp.asarray(r.integers(-1, n + 2, size=(B, T, Hkv, n)), jnp.int32)
    qpos = jnp.asarray(np.arange(T)[None] + np.array([[3800], [1500]]), jnp.int32)
    doc = jnp.zeros_like(qpos)
    valid = qpos < np.array([[S], [S - 100]])
    # With a huge pairwise limit the repeats are found by comparing slot pairs.
    _same_list_both_ways(monkeypatch, "PAIRWISE_MAX_SLOTS", 10_000, (bi, qpos, doc, valid),
                         dict(kv_len=S, block_size=bk, rows=64, packed=False))


def _same_list_both_ways(monkeypatch, knob: str, value, args, kw):
    """worklist.build gives the same lists before and after setting worklist.<knob> = value."""
    first = worklist.build(*args, **kw)
    monkeypatch.setattr(worklist, knob, value)
    second = worklist.build(*args, **kw)
    for name, a, b in zip(worklist.WorkList._fields, first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(jnp.sum(first.item_count)) == int(jnp.sum(first.entry_ok)) > 0


@pytest.mark.parametrize("B,Hkv,N,kv_len", [(1, 4, 8192, 700), (2, 3, 500, 4096), (3, 1, 64, 1)])
def test_one_sort_over_all_rows_matches_a_stable_sort_per_row(B, Hkv, N, kv_len):
    """sort_rows' composite (row, tile) sort gives each row's stable order and sorted keys,
    with ties (many entries per tile) and entries that take no part (int32 max) among them."""
    r = np.random.default_rng(N)
    big = np.iinfo(np.int32).max
    key = r.integers(0, kv_len, size=(B, Hkv, N)).astype(np.int32)
    key[r.random(key.shape) < 0.3] = big
    order, sorted_key = worklist.sort_rows(jnp.asarray(key), kv_len)
    want = np.argsort(key, axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(order), want)
    np.testing.assert_array_equal(np.asarray(sorted_key), np.take_along_axis(key, want, axis=-1))


@pytest.mark.parametrize("packed", [False, True])
def test_work_list_is_the_same_with_one_sort_or_a_sort_per_row(monkeypatch, packed):
    B, T, Hkv, K, S, bk = 2, 300, 3, 8, 1000, 64
    r = np.random.default_rng(1)
    bi = jnp.asarray(r.integers(-1, S // bk + 2, size=(B, T, Hkv, K)), jnp.int32)
    qpos = jnp.asarray(np.arange(T)[None] + np.array([[700], [100]]), jnp.int32)
    doc = jnp.asarray(r.integers(0, 100, size=(B, T)) if packed else np.zeros((B, T)), jnp.int32)
    valid = qpos < np.array([[S], [S - 300]])
    # With no room for composite keys each row is sorted alone.
    _same_list_both_ways(monkeypatch, "KEY_LIMIT", 0, (bi, qpos, doc, valid),
                         dict(kv_len=S, block_size=bk, rows=64, packed=packed))
