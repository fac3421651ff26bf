"""The paged-cache suite every implementation passes (one base class, one subclass each).

Inputs are built contiguous first, then scattered into pages by a plain NumPy loop written
here (not the library's append), so "paged == contiguous" is checked against code that
shares nothing with the implementation: the float64 loop oracle (tests/oracle.py) reads the
contiguous arrays. Everything a kernel must never read is poisoned with NaN: pool pages no
row references, the slots of a row's last page past its length, and the page-table entries
past a row's used pages hold garbage ids (-1, P, 2**31 - 1, ...). Physical pages are handed
out in a random order.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
import oracle
from conformance import assert_lse_close, out_tol, rel_err


@dataclasses.dataclass(frozen=True)
class PagedCase:
    T: int
    lengths: tuple  # kv_length per row, the T new tokens included (0: a row of padding only)
    Hq: int = 4
    Hkv: int = 2
    D: int = 16
    Di: int = 16
    page: int = 16
    top_k: int = 3
    dtype: str = "float32"
    kv_fp8: bool = False
    index_fp8: bool = False
    q_offset: tuple | None = None
    spare_columns: int = 2  # page-table entries past the longest row (garbage)
    spare_pages: int = 3  # pool pages no row references (NaN)

    def __str__(self):
        fp8 = ("-kvfp8" if self.kv_fp8 else "") + ("-ifp8" if self.index_fp8 else "")
        off = f"-off{self.q_offset}" if self.q_offset else ""
        return (f"T{self.T}len{'_'.join(map(str, self.lengths))}G{self.Hq // self.Hkv}Hkv{self.Hkv}D{self.D}"
                f"Di{self.Di}p{self.page}K{self.top_k}{self.dtype}{fp8}{off}")


# T 1 / 8 / 16 (decode, multi-token prediction), T 20 (past common.DECODE_MAX_Q: chunked
# prefill; 80 index rows, two row tiles of the pallas scan), ragged lengths, a row of padding only (length 0), queries placed before the end
# (q_offset), G 1 / 2 / 4, top_k 1 / 3 / 4, fp32 / bf16, FP8 K/V and index keys.
PAGED_CASES = (
    PagedCase(1, (70, 33, 0)),
    PagedCase(8, (100, 40), Hq=8, top_k=4, dtype="bfloat16"),
    PagedCase(16, (64, 90), Hkv=4, q_offset=(40, 74)),
    PagedCase(1, (120, 47), dtype="bfloat16", kv_fp8=True, index_fp8=True),
    PagedCase(20, (80, 50), Hq=8, Hkv=4, dtype="bfloat16", index_fp8=True),
    PagedCase(3, (40, 16), top_k=1),
)

_GARBAGE_IDS = (-1, -7, 2**31 - 1, -(2**31))


def _scatter(pages, rows, table, lengths, page):
    """The NumPy page writer: token t of row b goes to pages[table[b, t // page], t % page]."""
    for b, n in enumerate(lengths):
        for t in range(n):
            pages[table[b, t // page], t % page] = rows[b, t]
    return pages


def build(rng, case: PagedCase):
    """(op kwargs, float64 contiguous oracle inputs, the PagedCache) for one case."""
    B, page = len(case.lengths), case.page
    lengths = np.asarray(case.lengths, np.int32)
    used = -(-lengths // page)
    max_pages = int(used.max()) + case.spare_columns
    P = int(used.sum()) + case.spare_pages
    perm = rng.permutation(P)
    table = rng.choice(np.asarray(_GARBAGE_IDS + (P, P + 5), np.int64), size=(B, max_pages)).astype(np.int32)
    start = 0
    for b, n in enumerate(used.tolist()):
        table[b, :n] = perm[start:start + n]
        start += n
    S = max_pages * page
    dt = jnp.dtype(case.dtype)
    normal = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dt))  # noqa: E731
    k, v = normal(B, S, case.Hkv, case.D), normal(B, S, case.Hkv, case.D)
    ik = normal(B, S, case.Di)
    q, iq = normal(B, case.T, case.Hq, case.D), normal(B, case.T, case.Hkv, case.Di)

    def store(x, fp8, head_shape):
        """(pages, scale pages or None, float64 values the pages mean)."""
        if fp8:
            vals, scale = (np.asarray(a) for a in msa_jax.quantize_fp8(jnp.asarray(x)))
            pages = np.full((P, page) + head_shape, np.nan, jnp.float8_e4m3fn)
            scales = np.full((P, page) + head_shape[:-1], np.nan, np.float32)
            meant = vals.astype(np.float64) * scale[..., None]
            return (_scatter(pages, vals, table, lengths, page), _scatter(scales, scale, table, lengths, page), meant)
        pages = np.full((P, page) + head_shape, np.nan, dt)
        return _scatter(pages, x, table, lengths, page), None, x.astype(np.float64)

    kp, ks, k64 = store(k, case.kv_fp8, (case.Hkv, case.D))
    vp, vs, v64 = store(v, case.kv_fp8, (case.Hkv, case.D))
    ikp, iks, ik64 = store(ik, case.index_fp8, (case.Di,))
    kw = dict(page_table=jnp.asarray(table), kv_length=jnp.asarray(lengths))
    if case.q_offset is not None:
        kw["q_offset"] = jnp.asarray(case.q_offset, jnp.int32)
    arrays = dict(q=jnp.asarray(q), k_pages=jnp.asarray(kp), v_pages=jnp.asarray(vp), index_q=jnp.asarray(iq),
                  index_k_pages=jnp.asarray(ikp), k_scale=None if ks is None else jnp.asarray(ks),
                  v_scale=None if vs is None else jnp.asarray(vs), index_k_scale=None if iks is None else jnp.asarray(iks))
    x64 = dict(q=q.astype(np.float64), k=k64, v=v64, index_q=iq.astype(np.float64), index_k=ik64)
    oracle_kw = dict(kv_length=lengths) | ({} if case.q_offset is None else dict(q_offset=np.asarray(case.q_offset)))
    return arrays, kw, x64, oracle_kw


def step(arrays, kw, case, implementation, *, jit=True):
    """paged_sparse_attention on a built case; jitted by default (one compilation instead of
    many eager ones: the suite's time is mostly compilation)."""
    fn = functools.partial(msa_jax.paged_sparse_attention, top_k=case.top_k, implementation=implementation)
    fn = jax.jit(fn) if jit else fn
    return fn(arrays["q"], arrays["k_pages"], arrays["v_pages"], arrays["index_q"], arrays["index_k_pages"],
              k_scale=arrays["k_scale"], v_scale=arrays["v_scale"], index_k_scale=arrays["index_k_scale"], **kw)


class PagedSuite:
    """Subclasses set `implementation`; `PAGED_CASES` parametrizes `paged_case`."""

    implementation: str = ""
    PAGED_CASES = PAGED_CASES

    def test_step_matches_oracle(self, rng, paged_case):
        """Selection, out and lse of the decode / prefill step against the float64 oracle on
        the contiguous values the pages hold (FP8: their dequantised values, exactly)."""
        case = paged_case
        arrays, kw, x64, okw = build(rng, case)
        res = step(arrays, kw, case, self.implementation)
        want_bi = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.page, **okw)
        want_out, want_lse = oracle.attention(x64["q"], x64["k"], x64["v"], want_bi, block_size=case.page, **okw)
        assert res.block_indices.dtype == jnp.int32 and res.out.dtype == arrays["q"].dtype
        np.testing.assert_array_equal(np.asarray(res.block_indices), want_bi)
        assert rel_err(res.out, want_out) < out_tol(case.dtype)
        assert_lse_close(res.lse, want_lse, 1e-4)
        assert not np.isnan(np.asarray(res.out, np.float32)).any()

    def test_constant_scores_follow_tie_rule(self, rng):
        """Equal index scores everywhere: the smallest page ids win, in ascending order, then
        the local page, whatever physical pages hold them (at batch 1 every page is its own
        split of the pallas scan, so the merge decides every tie)."""
        page, K, T, Hkv, Di = 16, 4, 3, 2, 16
        length = 7 * page + 5
        table, P = msa_jax.make_page_table([length], page, permutation=rng.permutation(8))
        keys = np.broadcast_to(rng.standard_normal(Di).astype(np.float32), (P, page, Di))
        iq = jnp.asarray(rng.standard_normal((1, T, Hkv, Di)), jnp.float32)
        got = jax.jit(lambda iq, keys: msa_jax.paged_select_blocks(
            iq, keys, page_table=jnp.asarray(table), kv_length=length, top_k=K, implementation=self.implementation,
        ))(iq, jnp.asarray(keys))
        np.testing.assert_array_equal(np.asarray(got), np.broadcast_to([0, 1, 2, 7], (1, T, Hkv, K)))

    def test_block_sparse_rows_are_sets(self, rng):
        """paged_block_sparse_attention reads each row as a set: permuted slots, -1, ids past
        the table or outside int range, and repeats give the oracle's answer for the set."""
        case = PagedCase(2, (75, 30), top_k=4)
        arrays, kw, x64, okw = build(rng, case)
        bi = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.page, **okw)
        extra = rng.choice(np.array([-1, -9, 7, 2**31 - 1, -(2**31)], np.int64), size=bi.shape[:-1] + (2,))
        messy = np.concatenate([rng.permuted(bi, axis=-1), extra.astype(np.int32), bi[..., :2]], axis=-1)
        out, lse = msa_jax.paged_block_sparse_attention(
            arrays["q"], arrays["k_pages"], arrays["v_pages"], jnp.asarray(messy), return_lse=True,
            implementation=self.implementation, **kw,
        )
        want_out, want_lse = oracle.attention(x64["q"], x64["k"], x64["v"], bi, block_size=case.page, **okw)
        assert rel_err(out, want_out) < 1e-5
        assert_lse_close(lse, want_lse, 1e-4)

    def test_paged_equals_contiguous(self, rng):
        """The paged step gives what select_blocks + block_sparse_attention give on the contiguous arrays."""
        case = PagedCase(2, (90, 51))
        arrays, kw, x64, okw = build(rng, case)
        res = step(arrays, kw, case, self.implementation)
        f32 = lambda name: jnp.asarray(x64[name], jnp.float32)  # noqa: E731
        kw = dict(block_size=case.page, implementation=self.implementation)

        @jax.jit
        def contiguous(q, k, v, index_q, index_k, kv_length):
            bi = msa_jax.select_blocks(index_q, index_k, top_k=case.top_k, kv_length=kv_length, **kw)
            return bi, *msa_jax.block_sparse_attention(q, k, v, bi, kv_length=kv_length, return_lse=True, **kw)

        bi, out, lse = contiguous(*(f32(n) for n in ("q", "k", "v", "index_q", "index_k")), okw["kv_length"])
        np.testing.assert_array_equal(np.asarray(res.block_indices), np.asarray(bi))
        np.testing.assert_allclose(np.asarray(res.out), np.asarray(out), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(res.lse), np.asarray(lse), rtol=1e-5, atol=1e-5)

    def test_decode_loop_in_one_jit(self, rng):
        """Append + step for several tokens inside one jax.jit (lax.fori_loop): static shapes,
        no host synchronisation; each step equals the oracle at that step's length."""
        B, Hq, Hkv, D, Di, page, K, steps = 2, 4, 2, 16, 16, 16, 3, 4
        start = np.array([37, 15], np.int32)
        table, P = msa_jax.make_page_table(start + steps, page, permutation=rng.permutation(5))  # 3 + 2 pages
        n = table.shape[1] * page
        k, v = rng.standard_normal((2, B, n, Hkv, D)).astype(np.float32)
        ik = rng.standard_normal((B, n, Di)).astype(np.float32)
        q = rng.standard_normal((steps, B, 1, Hq, D)).astype(np.float32)
        iq = rng.standard_normal((steps, B, 1, Hkv, Di)).astype(np.float32)
        cache = msa_jax.init_paged_cache(table, num_pages=P, page_size=page, num_kv_heads=Hkv, head_dim=D,
                                         index_head_dim=Di, kv_dtype=jnp.float32)
        cache = msa_jax.paged_append(cache, k[:, :start.max()], v[:, :start.max()], ik[:, :start.max()], num_new=start)
        new = lambda x: jnp.stack([x[b, s:s + steps] for b, s in enumerate(start)])  # noqa: E731
        k_new, v_new, ik_new = new(k), new(v), new(ik)  # [B, steps, ...]: each row's next tokens
        impl = self.implementation

        @jax.jit
        def decode(cache, q, iq, k_new, v_new, ik_new):
            def body(i, carry):
                cache, outs = carry
                cache = msa_jax.paged_append(cache, k_new[:, i][:, None], v_new[:, i][:, None], ik_new[:, i][:, None])
                res = msa_jax.paged_sparse_attention(q[i], cache.k_pages, cache.v_pages, iq[i], cache.index_k_pages,
                                                     top_k=K, page_table=cache.page_table, kv_length=cache.kv_length,
                                                     implementation=impl)
                return cache, outs.at[i].set(res.out)

            return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(q.shape, q.dtype)))

        cache, outs = decode(cache, q, iq, k_new, v_new, ik_new)
        np.testing.assert_array_equal(np.asarray(cache.kv_length), start + steps)
        for i in range(steps):
            okw = dict(kv_length=start + i + 1)
            bi = oracle.select_blocks(iq[i], ik, top_k=K, block_size=page, **okw)
            want, _ = oracle.attention(q[i], k, v, bi, block_size=page, **okw)
            assert rel_err(outs[i], want) < 1e-5, i

    def test_cuda_falls_through_with_a_reason(self, rng):
        """No cuda kernel for the paged attention alone (the decode step runs cuda's scan, then
        Pallas's attention, on a Hopper GPU only): forcing cuda names why; a list falls through."""
        case = PagedCase(1, (40, 20))
        arrays, kw, _, _ = build(rng, case)
        with pytest.raises(NotImplementedError, match="cuda: no CUDA kernel for paged_block_sparse_attention"):
            msa_jax.paged_block_sparse_attention(arrays["q"], arrays["k_pages"], arrays["v_pages"],
                                                 jnp.zeros(arrays["q"].shape[:2] + (arrays["k_pages"].shape[2], 1),
                                                           jnp.int32), implementation="cuda", **kw)
        if jax.default_backend() == "gpu":
            return  # cuda serves the step there (tests/test_cuda_paged.py)
        with pytest.raises(NotImplementedError, match="cuda: needs a CUDA GPU"):
            step(arrays, kw, case, "cuda")
        res = step(arrays, kw, case, ("cuda", self.implementation))
        want = step(arrays, kw, case, self.implementation)
        np.testing.assert_array_equal(np.asarray(res.out), np.asarray(want.out))
