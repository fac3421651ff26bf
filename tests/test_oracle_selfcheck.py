"""Checks the NumPy oracle against hand-computable facts, with no JAX.

The oracle is the ground truth for everything else, so it has to earn trust on its own:
exactness vs dense causal attention below K blocks, its closed-form KL gradient vs finite
differences, and the padding contract.
"""

import numpy as np

import oracle


def _dense_causal(q, k, v, scale):
    # Written out independently of the oracle: plain causal softmax, T == S, GQA by h // G.
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros_like(q)
    lse = np.zeros(q.shape[:3])
    for b in range(B):
        for i in range(T):
            for h in range(Hq):
                logits = scale * k[b, : i + 1, h // G] @ q[b, i, h]
                lse[b, i, h] = np.log(np.sum(np.exp(logits)))
                out[b, i, h] = np.exp(logits - lse[b, i, h]) @ v[b, : i + 1, h // G]
    return out, lse


def test_fewer_blocks_than_top_k_is_dense_causal():
    rng = np.random.default_rng(0)
    B, T, Hq, Hkv, D, Di, Bk = 1, 5, 4, 2, 3, 4, 2
    q = rng.standard_normal((B, T, Hq, D))
    k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D))
    iq = rng.standard_normal((B, T, Hkv, Di))
    ik = rng.standard_normal((B, T, Di))

    bi = oracle.select_blocks(iq, ik, top_k=8, block_size=Bk)
    assert bi.shape == (B, T, Hkv, 8) and bi.dtype == np.int32
    for i in range(T):
        local = i // Bk
        for g in range(Hkv):
            row = bi[0, i, g]
            # Every visible block, local block right after the ranked earlier ones.
            assert sorted(row[: local + 1].tolist()) == list(range(local + 1))
            assert row[local] == local
            assert np.all(row[local + 1:] == -1)

    want_out, want_lse = _dense_causal(q, k, v, 1 / np.sqrt(D))
    out, lse = oracle.attention(q, k, v, bi, block_size=Bk)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    out_d, lse_d = oracle.attention(q, k, v, None, block_size=Bk, dense=True)
    np.testing.assert_allclose(out_d, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse_d, want_lse, rtol=1e-12, atol=1e-12)


def test_kl_gradient_matches_finite_difference():
    rng = np.random.default_rng(1)
    B, T, Hq, Hkv, D, Di, Bk = 2, 7, 4, 2, 3, 3, 2
    q = rng.standard_normal((B, T, Hq, D))
    k = rng.standard_normal((B, T, Hkv, D))
    iq = rng.standard_normal((B, T, Hkv, Di))
    ik = rng.standard_normal((B, T, Di))
    # Row 1 is shorter, so its tail queries are padding and must get zero gradient.
    kw = dict(block_size=Bk, q_offset=0, kv_length=np.array([7, 5]), kl_coeff=0.7)
    # top_k=2 makes the support genuinely sparse; it is held fixed because the loss is
    # only differentiable in the index tensors for a fixed selection.
    bi = oracle.select_blocks(iq, ik, top_k=2, block_size=Bk, q_offset=0,
                              kv_length=kw["kv_length"])
    assert np.all(bi[1, 5:] == -1)

    loss, d_iq, d_ik = oracle.kl_loss(q, k, iq, ik, bi, **kw)
    assert loss > 0
    assert np.all(d_iq[1, 5:] == 0) and np.all(d_ik[1, 5:] == 0)

    eps = 1e-6
    entries_q = [(0, 0, 0, 0), (0, 4, 1, 2), (0, 6, 0, 1), (1, 3, 1, 0), (1, 6, 0, 2)]
    entries_k = [(0, 0, 0), (0, 3, 2), (0, 6, 1), (1, 1, 0), (1, 4, 2), (1, 6, 1)]
    for arr, grad, entries, name in ((iq, d_iq, entries_q, "q"), (ik, d_ik, entries_k, "k")):
        for idx in entries:
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = (plus, ik) if name == "q" else (iq, plus)
            lp = oracle.kl_loss(q, k, *args, bi, **kw)[0]
            args = (minus, ik) if name == "q" else (iq, minus)
            lm = oracle.kl_loss(q, k, *args, bi, **kw)[0]
            fd = (lp - lm) / (2 * eps)
            np.testing.assert_allclose(grad[idx], fd, rtol=1e-5, atol=1e-9,
                                       err_msg=f"index_{name}{idx}")


def test_padding_query_contract():
    rng = np.random.default_rng(2)
    B, T, Hq, Hkv, D, Di, Bk = 1, 5, 2, 1, 3, 3, 2
    q = rng.standard_normal((B, T, Hq, D))
    k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D))
    iq = rng.standard_normal((B, T, Hkv, Di))
    ik = rng.standard_normal((B, T, Di))

    # Both ways to be padding: p >= kv_length (q_offset=0) and p < 0 (default offset).
    for q_offset, pad in ((0, [3, 4]), (None, [0, 1])):
        kw = dict(block_size=Bk, q_offset=q_offset, kv_length=3)
        bi = oracle.select_blocks(iq, ik, top_k=2, **kw)
        out, lse = oracle.attention(q, k, v, bi, **kw)
        for i in pad:
            assert np.all(bi[0, i] == -1)
            assert np.all(out[0, i] == 0)
            assert np.all(lse[0, i] == -np.inf)
        for i in sorted(set(range(T)) - set(pad)):
            assert np.all(np.isfinite(lse[0, i]))


def test_segments_do_not_leak():
    rng = np.random.default_rng(3)
    B, T, Hq, Hkv, D, Di, Bk = 1, 5, 2, 1, 3, 3, 2
    q = rng.standard_normal((B, T, Hq, D))
    k = rng.standard_normal((B, T, Hkv, D))
    v = rng.standard_normal((B, T, Hkv, D))
    iq = rng.standard_normal((B, T, Hkv, Di))
    ik = rng.standard_normal((B, T, Di))
    seg = np.array([[7, 7, 7, 4, 4]])
    bi = oracle.select_blocks(iq, ik, top_k=1, block_size=Bk, segment_ids=seg)
    # Document-relative grid: query 3 opens document 2, so its local block is 0 again.
    assert bi[0, :, 0, 0].tolist() == [0, 0, 1, 0, 0]
    out, lse = oracle.attention(q, k, v, bi, block_size=Bk, segment_ids=seg)
    np.testing.assert_allclose(out[0, 3], v[0, [3, 3], 0], rtol=1e-12)
    np.testing.assert_allclose(lse[0, 3], np.sqrt(1 / D) * (q[0, 3] @ k[0, 3, 0]),
                               rtol=1e-12)
