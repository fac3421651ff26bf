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
    kw = dict(kv_len=S, block_size=bk, rows=64, packed=False)
    by_sort = worklist.build(bi, qpos, doc, valid, **kw)
    monkeypatch.setattr(worklist, "PAIRWISE_MAX_SLOTS", 10_000)
    by_pairs = worklist.build(bi, qpos, doc, valid, **kw)
    for name, a, b in zip(worklist.WorkList._fields, by_sort, by_pairs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(jnp.sum(by_sort.item_count)) == int(jnp.sum(by_sort.entry_ok)) > 0
