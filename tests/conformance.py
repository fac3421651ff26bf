"""The conformance suite every implementation passes: one base class, one subclass each.

Numbers are compared with the float64 loop oracle (tests/oracle.py, written from the spec
independently of the package) on the same dtype-rounded inputs. A subclass sets
`implementation` and may narrow `CASES` to what it serves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax.test_util
from jax.ad_checkpoint import checkpoint_policies

import msa_jax
import oracle


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    S: int
    Hq: int
    Hkv: int
    D: int
    Di: int
    block_size: int
    top_k: int
    dtype: str
    q_offset: tuple | None = None
    kv_length: tuple | None = None
    segments: tuple | None = None  # document lengths, the same for every row

    def __str__(self):
        extra = "".join(
            f"-{n}{getattr(self, n)}" for n in ("q_offset", "kv_length", "segments") if getattr(self, n)
        )
        return (
            f"B{self.B}T{self.T}S{self.S}G{self.Hq // self.Hkv}Hkv{self.Hkv}D{self.D}Di{self.Di}"
            f"bk{self.block_size}K{self.top_k}{self.dtype}{extra}"
        )


# Together these cover: T < S and T == S, S not a multiple of the block, block sizes
# 16/32/64/128, top_k 1/3/16, G 1/2/4/8/16, D 64/128, bf16/fp16/fp32, chunked prefill, decode,
# ragged kv_length with right padding, packed documents.
CASES = (
    Case(1, 200, 200, 2, 2, 64, 64, 16, 3, "float32"),
    Case(2, 100, 300, 4, 2, 128, 64, 32, 3, "bfloat16"),
    Case(2, 330, 330, 16, 4, 64, 32, 16, 16, "float32", q_offset=(0, 0), kv_length=(330, 250)),
    Case(1, 520, 520, 8, 1, 64, 64, 128, 3, "bfloat16"),
    Case(1, 260, 260, 16, 1, 128, 128, 16, 1, "float32"),
    Case(2, 150, 150, 4, 1, 64, 64, 16, 3, "float32", segments=(40, 70, 40)),
    Case(2, 16, 300, 8, 2, 64, 64, 32, 16, "bfloat16", q_offset=(284, 100)),
    Case(2, 1, 333, 16, 2, 64, 64, 16, 3, "float32", kv_length=(333, 200)),
    Case(1, 320, 320, 4, 1, 64, 64, 64, 3, "float16"),
)


def position_kwargs(case: Case) -> dict:
    kw = {}
    if case.q_offset is not None:
        kw["q_offset"] = np.asarray(case.q_offset, np.int32)
    if case.kv_length is not None:
        kw["kv_length"] = np.asarray(case.kv_length, np.int32)
    if case.segments is not None:
        row = np.repeat(np.arange(len(case.segments)), case.segments).astype(np.int32)
        kw["segment_ids"] = np.tile(row, (case.B, 1))
    return kw


def make_inputs(rng, case: Case):
    """Random non-zero inputs in the case's dtype, plus their float64 values for the oracle."""
    shapes = dict(
        q=(case.B, case.T, case.Hq, case.D),
        k=(case.B, case.S, case.Hkv, case.D),
        v=(case.B, case.S, case.Hkv, case.D),
        index_q=(case.B, case.T, case.Hkv, case.Di),
        index_k=(case.B, case.S, case.Di),
    )
    xs = {n: jnp.asarray(rng.standard_normal(s), case.dtype) for n, s in shapes.items()}
    return xs, {n: np.asarray(x, np.float64) for n, x in xs.items()}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def assert_lse_close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=tol)


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened, in float64 (the gradient checks at scale)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_bitwise_equal(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    # Compare bit patterns: catches -0 vs +0 and NaN payloads that == would hide.
    bits = f"u{a.dtype.itemsize}"
    np.testing.assert_array_equal(a.view(bits), b.view(bits), err_msg=f"{name}: two runs differ")


def assert_lse_close_scaled(got, want, tol):
    """-inf exactly where the reference has it; elsewhere |got - want| <= tol * max(1, |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "lse has NaN"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all(), "lse has +inf"
    err = np.abs(got[finite] - want[finite]) / np.maximum(1.0, np.abs(want[finite]))
    assert err.size == 0 or err.max() <= tol, f"lse error {err.max():.3g} > {tol}"


# Relative-error tolerances by input dtype: bf16 (8-bit mantissa) and fp16 (11-bit) inputs
# and outputs against the float64 oracle on the same rounded inputs; fp32 otherwise.
_LOW_PRECISION_TOL = {"bfloat16": 1e-2, "float16": 2e-3}


def out_tol(dtype):
    return _LOW_PRECISION_TOL.get(dtype, 1e-5)


def grad_tol(dtype):
    """KL gradients: the index scores are rounded once more (P, R in the input dtype)."""
    return 2 * _LOW_PRECISION_TOL[dtype] if dtype in _LOW_PRECISION_TOL else 1e-4


class ConformanceSuite:
    """Subclasses set `implementation`; `CASES` / `GRAD_CASES` parametrize the `case` /
    `grad_case` arguments (tests/conftest.py) and may be narrowed where a run is slow."""

    implementation: str = ""
    supports_float64: bool = False
    CASES = CASES
    GRAD_CASES = (CASES[1], CASES[2], CASES[5], CASES[6])
    # mode="dense" end to end against the oracle; None: every case of CASES.
    DENSE_CASES: tuple | None = None
    # The tests written for one fixed shape take these, so an implementation that serves only
    # some blocks, dtypes or head dims (cuda: block 128, bf16, D and Di 64 / 128) runs them
    # too: lengths scale with fixed_block / 16; fixed_dim, if set, is D and Di.
    fixed_block: int = 16
    fixed_dtype: str = "float32"
    fixed_dim: int | None = None

    def _dims(self, d: int, di: int) -> tuple[int, int]:
        return (d, di) if self.fixed_dim is None else (self.fixed_dim, self.fixed_dim)

    def _rerun_tol(self, dtype: str) -> dict:
        """Two computations of the same value by the same kernels in another order (slots
        permuted, jit vs eager, vmap): exact up to one rounding of the output dtype."""
        tol = _LOW_PRECISION_TOL.get(dtype, 1e-6)
        return dict(rtol=tol, atol=tol)

    # ---- selection -------------------------------------------------------------------

    def test_select_blocks_matches_oracle(self, rng, case):
        xs, x64 = make_inputs(rng, case)
        kw = position_kwargs(case)
        got = msa_jax.select_blocks(
            xs["index_q"], xs["index_k"], top_k=case.top_k, block_size=case.block_size,
            implementation=self.implementation, **kw,
        )
        want = oracle.select_blocks(
            x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.block_size, **kw
        )
        assert got.dtype == jnp.int32 and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)

    def test_constant_scores_follow_tie_rule(self, rng):
        """Equal index scores: the smallest block ids win, in ascending order, then local."""
        bk = self.fixed_block
        B, T, S, Hkv, Di, K = 1, 10 * bk, 10 * bk, 2, self._dims(16, 16)[1], 4
        dt = self.fixed_dtype
        index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, Di)), dt)
        index_k = jnp.broadcast_to(jnp.asarray(rng.standard_normal(Di), dt), (B, S, Di))
        got = np.asarray(
            msa_jax.select_blocks(index_q, index_k, top_k=K, block_size=bk, implementation=self.implementation)
        )
        for i in range(T):
            local = i // bk
            n = min(K - 1, local)
            row = list(range(n)) + [local] + [-1] * (K - 1 - n)
            np.testing.assert_array_equal(got[0, i], np.tile(row, (Hkv, 1)), err_msg=f"query {i}")

    # ---- main branch -----------------------------------------------------------------

    def test_block_sparse_attention_matches_oracle(self, rng, case):
        xs, x64 = make_inputs(rng, case)
        kw = position_kwargs(case)
        bi = oracle.select_blocks(
            x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.block_size, **kw
        )
        out, lse = msa_jax.block_sparse_attention(
            xs["q"], xs["k"], xs["v"], jnp.asarray(bi), block_size=case.block_size, return_lse=True,
            implementation=self.implementation, **kw,
        )
        want_out, want_lse = oracle.attention(
            x64["q"], x64["k"], x64["v"], bi, block_size=case.block_size, **kw
        )
        assert out.dtype == xs["q"].dtype and lse.dtype == jnp.float32
        assert rel_err(out, want_out) < out_tol(case.dtype)
        assert_lse_close(lse, want_lse, 1e-4)

    def test_block_indices_are_sets(self, rng):
        """Order, -1, out-of-range ids and duplicates do not change the result."""
        case = self.CASES[2]
        xs, x64 = make_inputs(rng, case)
        kw = position_kwargs(case)
        bi = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.block_size, **kw)
        messy = rng.permuted(bi, axis=-1)
        extra = rng.choice(np.array([-1, -7, 10_000, 2**31 - 1, -(2**31)], np.int64), size=bi.shape[:-1] + (3,))
        messy = np.concatenate([messy, extra.astype(np.int32), bi[..., :2]], axis=-1)  # dups too
        f = lambda b: msa_jax.block_sparse_attention(
            xs["q"], xs["k"], xs["v"], jnp.asarray(b), block_size=case.block_size, return_lse=True,
            implementation=self.implementation, **kw,
        )
        (o1, l1), (o2, l2) = f(bi), f(messy)
        np.testing.assert_allclose(np.asarray(o2, np.float32), np.asarray(o1, np.float32), **self._rerun_tol(case.dtype))
        np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=1e-6, atol=1e-6)

    def test_sparse_equals_dense_below_budget(self, rng):
        """For positions < top_k * block_size MSA is dense causal attention (spec)."""
        bk, dt = self.fixed_block, self.fixed_dtype
        (D, Di), K = self._dims(64, 32), 4
        B, T, Hq, Hkv = 2, K * bk, 8, 2
        q, k, v = (jnp.asarray(rng.standard_normal(s), dt) for s in
                   [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D)])
        iq = jnp.asarray(rng.standard_normal((B, T, Hkv, Di)), dt)
        ik = jnp.asarray(rng.standard_normal((B, T, Di)), dt)
        res = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=K, block_size=bk, implementation=self.implementation)
        # "highest": on a GPU XLA's fp32 dots default to tf32 (1e-3 error), which this
        # fp32 comparison would charge to the implementation.
        with jax.default_matmul_precision("highest"):
            dense = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True,
                                                 implementation="xla")
        assert rel_err(res.out, dense) < out_tol(dt)
        for i in range(T):
            assert sorted(np.asarray(res.block_indices)[0, i, 0][: i // bk + 1].tolist()) == list(range(i // bk + 1))

    # ---- full op and KL ----------------------------------------------------------------

    def test_sparse_attention_matches_oracle(self, rng, case):
        self._check_against_oracle(rng, case, "sparse")

    def test_dense_mode_matches_oracle(self, rng, dense_case):
        self._check_against_oracle(rng, dense_case, "dense")

    def _check_against_oracle(self, rng, case, mode):
        xs, x64 = make_inputs(rng, case)
        kw = position_kwargs(case)
        res = msa_jax.sparse_attention(
            *xs.values(), top_k=case.top_k, block_size=case.block_size, mode=mode, kl_coeff=0.5,
            implementation=self.implementation, **kw,
        )
        bi = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.block_size, **kw)
        dense = mode == "dense"
        out, lse = oracle.attention(x64["q"], x64["k"], x64["v"], bi, block_size=case.block_size, dense=dense, **kw)
        kl, diq, dik = oracle.kl_loss(
            x64["q"], x64["k"], x64["index_q"], x64["index_k"], bi, block_size=case.block_size,
            kl_coeff=0.5, dense=dense, **kw,
        )
        np.testing.assert_array_equal(np.asarray(res.block_indices), bi)
        assert rel_err(res.out, out) < out_tol(case.dtype)
        assert_lse_close(res.lse, lse, 1e-4)
        assert res.kl_loss.dtype == jnp.float32 and res.kl_loss.shape == ()
        np.testing.assert_allclose(float(res.kl_loss), kl, rtol=1e-4, atol=1e-6)

        def kl_of(iq, ik):
            return msa_jax.sparse_attention(
                xs["q"], xs["k"], xs["v"], iq, ik, top_k=case.top_k, block_size=case.block_size, mode=mode,
                kl_coeff=0.5, implementation=self.implementation, **kw,
            ).kl_loss

        g_iq, g_ik = jax.grad(kl_of, argnums=(0, 1))(xs["index_q"], xs["index_k"])
        tol = grad_tol(case.dtype)
        assert rel_err(g_iq, diq) < tol and rel_err(g_ik, dik) < tol

    def test_index_kl_loss_matches_sparse_attention(self, rng):
        case = self.CASES[5 % len(self.CASES)]
        xs, _ = make_inputs(rng, case)
        kw = position_kwargs(case)
        for mode in ("sparse", "dense"):
            res = msa_jax.sparse_attention(
                *xs.values(), top_k=case.top_k, block_size=case.block_size, mode=mode,
                implementation=self.implementation, **kw,
            )
            kl = msa_jax.index_kl_loss(
                xs["q"], xs["k"], xs["index_q"], xs["index_k"], res.block_indices, block_size=case.block_size,
                mode=mode, implementation=self.implementation, **kw,
            )
            np.testing.assert_allclose(float(kl), float(res.kl_loss), rtol=1e-6)

    # ---- padding, packing --------------------------------------------------------------

    def test_padding_rows(self, rng):
        """Padding queries: out 0, lse -inf, rows -1, no loss, and zero gradient."""
        bk, u = self.fixed_block, self.fixed_block // 16
        (D, Di), K = self._dims(32, 16), 2
        B, T, S, Hq, Hkv = 2, 48 * u, 48 * u, 4, 2
        xs, _ = make_inputs(rng, Case(B, T, S, Hq, Hkv, D, Di, bk, K, self.fixed_dtype))
        q_offset = np.array([-10 * u, 0], np.int32)  # row 0: the first 10 u queries sit before the keys
        kv_length = np.array([48 * u, 30 * u], np.int32)  # row 1: queries from 30 u on are past the keys
        pad = np.zeros((B, T), bool)
        pad[0, :10 * u] = True
        pad[1, 30 * u:] = True

        def run(q, k, v, iq, ik):
            return msa_jax.sparse_attention(
                q, k, v, iq, ik, top_k=K, block_size=bk, q_offset=q_offset, kv_length=kv_length,
                implementation=self.implementation,
            )

        res = run(*xs.values())
        assert np.all(np.asarray(res.out)[pad] == 0) and np.all(np.isneginf(np.asarray(res.lse)[pad]))
        assert np.all(np.asarray(res.block_indices)[pad] == -1)
        assert np.all(np.isfinite(np.asarray(res.lse)[~pad]))
        w = jnp.asarray(rng.standard_normal(res.out.shape), jnp.float32)
        grads = jax.grad(lambda *a: jnp.sum(run(*a).out * w) + run(*a).kl_loss, argnums=(0, 3))(*xs.values())
        for g in grads:
            assert np.all(np.asarray(g)[pad] == 0) and np.any(np.asarray(g)[~pad] != 0)

        # Changing a padding query's inputs changes nothing.
        xs2 = dict(xs)
        xs2["q"] = xs["q"].at[1, 40 * u].set(100.0)
        xs2["index_q"] = xs["index_q"].at[1, 40 * u].set(-100.0)
        res2 = run(*xs2.values())
        np.testing.assert_array_equal(np.asarray(res2.out), np.asarray(res.out))
        assert float(res2.kl_loss) == float(res.kl_loss)

    def test_all_padding_gives_zero_loss(self, rng):
        bk = self.fixed_block
        xs, _ = make_inputs(rng, Case(1, bk, bk, 2, 1, *self._dims(16, 16), bk, 2, self.fixed_dtype))
        res = msa_jax.sparse_attention(*xs.values(), top_k=2, block_size=bk, kv_length=0, implementation=self.implementation)
        assert float(res.kl_loss) == 0.0 and np.all(np.asarray(res.out) == 0)

    def test_packed_documents_equal_separate_calls(self, rng):
        bk, K = self.fixed_block, 3
        lengths = tuple(n * bk // 16 for n in (37, 70, 21))  # documents start inside blocks
        T = sum(lengths)
        seg = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
        case = Case(1, T, T, 4, 2, *self._dims(32, 16), bk, K, self.fixed_dtype)
        xs, _ = make_inputs(rng, case)
        # The same kernels over other tiles and work items: equal up to a rounding of the dtype.
        tol = self._rerun_tol(self.fixed_dtype)
        packed = msa_jax.sparse_attention(
            *xs.values(), top_k=K, block_size=bk, segment_ids=seg, implementation=self.implementation
        )
        start, kl_total = 0, 0.0
        for n in lengths:
            part = {
                name: (x[:, start:start + n]) for name, x in xs.items()
            }
            one = msa_jax.sparse_attention(*part.values(), top_k=K, block_size=bk, implementation=self.implementation)
            sl = slice(start, start + n)
            f32 = lambda x: np.asarray(x, np.float32)
            np.testing.assert_allclose(f32(packed.out[:, sl]), f32(one.out), rtol=tol["rtol"], atol=max(tol["atol"], 1e-6))
            np.testing.assert_allclose(np.asarray(packed.lse[:, sl]), np.asarray(one.lse), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(packed.block_indices[:, sl]), np.asarray(one.block_indices))
            kl_total += float(one.kl_loss) * n  # each call normalises by its own N
            start += n
        np.testing.assert_allclose(float(packed.kl_loss), kl_total / T, rtol=1e-5 if self.fixed_dtype == "float32" else 1e-4)

    # ---- gradients and transformations -------------------------------------------------

    def test_check_grads(self, rng):
        """Numerical vs analytic gradients in float64 for the attention and the KL."""
        if not self.supports_float64:
            pytest.skip(f"{self.implementation} has no float64 kernels; test_grads_match_xla covers it")
        case = Case(1, 24, 40, 4, 2, 16, 16, 16, 2, "float32", kv_length=(37,))
        kw = position_kwargs(case)
        with jax.enable_x64(True):
            xs = {n: jnp.asarray(x, jnp.float64) for n, x in make_inputs(rng, case)[1].items()}
            bi = msa_jax.select_blocks(xs["index_q"], xs["index_k"], top_k=2, block_size=16, **kw)
            w = jnp.asarray(rng.standard_normal((1, 24, 4, 16)))
            w2 = jnp.asarray(rng.standard_normal((1, 24, 4)))

            def attn(q, k, v):
                out, lse = msa_jax.block_sparse_attention(
                    q, k, v, bi, block_size=16, return_lse=True, implementation=self.implementation, **kw
                )
                return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w2)

            def kl(iq, ik):
                return msa_jax.index_kl_loss(
                    xs["q"], xs["k"], iq, ik, bi, block_size=16, implementation=self.implementation, **kw
                )

            jax.test_util.check_grads(attn, (xs["q"], xs["k"], xs["v"]), order=1, modes=["rev"], eps=1e-6)
            jax.test_util.check_grads(kl, (xs["index_q"], xs["index_k"]), order=1, modes=["rev"], eps=1e-6)

    def test_grads_match_xla(self, rng, grad_case):
        """All five gradients against the xla reference (itself checked by check_grads)."""
        case = grad_case
        xs, _ = make_inputs(rng, case)
        kw = position_kwargs(case)
        w = jnp.asarray(rng.standard_normal((case.B, case.T, case.Hq, case.D)), jnp.float32)

        def loss(impl, *a):
            r = msa_jax.sparse_attention(*a, top_k=case.top_k, block_size=case.block_size, implementation=impl, **kw)
            finite_lse = jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)
            return jnp.sum(r.out.astype(jnp.float32) * w) + jnp.sum(jnp.sin(finite_lse)) + r.kl_loss

        args = tuple(xs.values())
        got = jax.grad(loss, argnums=tuple(range(1, 6)))(self.implementation, *args)
        want = jax.grad(loss, argnums=tuple(range(1, 6)))("xla", *args)
        for name, g, h in zip(xs, got, want):
            g, h = np.asarray(g, np.float64).ravel(), np.asarray(h, np.float64).ravel()
            cosine = g @ h / (np.linalg.norm(g) * np.linalg.norm(h))
            assert cosine > (0.999 if case.dtype in _LOW_PRECISION_TOL else 0.99999), (name, cosine)

    def test_gradient_detach(self, rng):
        """kl_loss reaches only index_q/index_k; out and lse reach only q, k, v."""
        bk = self.fixed_block
        case = Case(1, 4 * bk, 4 * bk, 2, 2, *self._dims(64, 64), bk, 3, self.fixed_dtype)
        xs, _ = make_inputs(rng, case)
        f = lambda *a: msa_jax.sparse_attention(*a, top_k=3, block_size=bk, implementation=self.implementation)
        g_kl = jax.grad(lambda *a: f(*a).kl_loss, argnums=tuple(range(5)))(*xs.values())
        g_out = jax.grad(lambda *a: jnp.sum(f(*a).out) + jnp.sum(jnp.where(jnp.isfinite(f(*a).lse), f(*a).lse, 0)),
                         argnums=tuple(range(5)))(*xs.values())
        for g in g_kl[:3] + g_out[3:]:
            assert np.all(np.asarray(g) == 0)
        for g in g_kl[3:] + g_out[:3]:
            assert np.linalg.norm(np.asarray(g)) > 0

    def test_jit_vmap_checkpoint(self, rng):
        bk, u = self.fixed_block, self.fixed_block // 16
        case = Case(2, 40 * u, 56 * u, 4, 2, *self._dims(16, 16), bk, 3, self.fixed_dtype)
        xs, _ = make_inputs(rng, case)
        f = lambda *a: msa_jax.sparse_attention(*a, top_k=3, block_size=bk, implementation=self.implementation)
        tol = self._rerun_tol(case.dtype)
        f32 = lambda x: np.asarray(x, np.float32)
        eager = f(*xs.values())
        jitted = jax.jit(f)(*xs.values())
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(f32(a), f32(b), **tol)

        # vmap over an extra leading axis = one call per slice.
        stacked = {n: jnp.stack([x, x[::-1]]) for n, x in xs.items()}
        mapped = jax.vmap(f)(*stacked.values())
        for j in range(2):
            one = f(*(x[j] for x in stacked.values()))
            np.testing.assert_allclose(f32(mapped.out[j]), f32(one.out), **tol)
            np.testing.assert_allclose(float(mapped.kl_loss[j]), float(one.kl_loss), rtol=1e-6)

        # jax.checkpoint with a policy that keeps the tagged residuals: same gradients.
        def loss(*a):
            r = f(*a)
            return jnp.sum(jnp.sin(r.out)) + r.kl_loss

        policy = checkpoint_policies.save_only_these_names("msa_out", "msa_lse")
        g_plain = jax.grad(loss, argnums=tuple(range(5)))(*xs.values())
        g_remat = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy), argnums=tuple(range(5))))(*xs.values())
        grad_tol_ = dict(rtol=1e-5, atol=1e-6) if case.dtype == "float32" else tol
        for a, b in zip(g_plain, g_remat):
            np.testing.assert_allclose(f32(a), f32(b), **grad_tol_)
