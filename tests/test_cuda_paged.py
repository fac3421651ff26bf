"""The `cuda` implementation of paged_select_blocks (issue #15): the SM90 paged index scan.

Everywhere (CPU included): `supports` serves paged_select_blocks on the shapes the kernel is
built for and names the reason for the others; it serves the decode step
(paged_sparse_attention: this scan, then Pallas's paged attention) where Pallas's attention
serves it too, and not the paged attention alone; without a GPU the dispatcher falls through. The glue around the kernel (msa_jax/cuda.py and
msa_jax/paged_scan.py: positions to local pages, the split plan, the merge of the per-split
lists, the local page appended) runs here with the FFI call replaced by a jnp emulation of the
contract cuda/include/msa/params.h states for it (PagedIndexerParams), against the float64
oracle on the paged suite's cases, with one page per split and with several.

On a Hopper GPU (marked `gpu`): the kernel against the `xla` reference on the same paged
inputs (tests/paged_conformance.py's builder: scrambled physical pages, NaN in every page no
row may read, garbage page-table entries past each row's pages): T 1, 8, 16 and 40 (> 16:
three row tiles), ragged kv_length, a row of padding only, queries past kv_length and before
0 (q_offset), bf16 and fp16, Di 64 and 128, top_k 8 / 16 / 32, FP8 keys; each with the
default split and with the whole sequence in one split (the ring of stages wraps many
times). Rows are checked as tests/test_cuda.py checks the contiguous indexer's (selection_check:
the spec's row up to near-ties, and at least 99% of rows identical to the reference's); the
tie rule on constant keys exactly; and that the default implementation on the GPU is the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
import oracle
from msa_jax import cuda as cuda_impl
from msa_jax import dispatch, paged_scan
from msa_jax.ffi import ops
from conformance import assert_lse_close, out_tol, rel_err
from paged_conformance import PAGED_CASES, PagedCase, build, step
from selection_check import block_scores, check_selection, query_blocks
from test_cuda import MIN_EXACT_ROWS, TIE_TOL, requires_gpu


def _select(arrays, kw, top_k, implementation):
    fn = jax.jit(lambda iq, ik, scale, kw: msa_jax.paged_select_blocks(
        iq, ik, index_k_scale=scale, top_k=top_k, implementation=implementation, **kw))
    return fn(arrays["index_q"], arrays["index_k_pages"], arrays["index_k_scale"], kw)


# ---- everywhere ------------------------------------------------------------------------------


def _call(**overrides):
    fields = dict(op="paged_select_blocks", batch=1, q_len=1, kv_len=1 << 20, num_q_heads=4, num_kv_heads=4,
                  head_dim=1, index_head_dim=128, dtype="bfloat16", index_dtype="bfloat16", has_segments=False,
                  config=msa_jax.MSAConfig(**overrides.pop("config", {})), platform="gpu",
                  index_cache_dtype="bfloat16")
    fields.update(overrides)
    return msa_jax.config.CallInfo(**fields)


def test_supports_paged_select_blocks(monkeypatch):
    impl = cuda_impl.CudaImplementation()
    # Pretend the extension and a Hopper GPU are there: the shape checks come next.
    monkeypatch.setattr(cuda_impl.ffi, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_impl, "_device_reason", lambda: None)
    for dtype in ("bfloat16", "float16"):
        for Di in (64, 128):
            for cache in (dtype, "float8_e4m3fn"):
                assert impl.supports(_call(dtype=dtype, index_dtype=dtype, index_head_dim=Di,
                                           index_cache_dtype=cache)) is None
    assert impl.supports(_call(q_len=40, batch=8, config=dict(top_k=32))) is None
    assert "index dtype float32" in impl.supports(_call(dtype="float32", index_dtype="float32",
                                                        index_cache_dtype="float32"))
    assert "Di=96" in impl.supports(_call(index_head_dim=96))
    assert "block_size=64" in impl.supports(_call(config=dict(block_size=64)))  # the page size
    assert "top_k=33" in impl.supports(_call(config=dict(top_k=33)))
    assert "no CUDA kernel for paged_block_sparse_attention" in impl.supports(_call(op="paged_block_sparse_attention"))
    # The decode step: this scan's limits, then those of Pallas's paged attention (on a Hopper GPU).
    monkeypatch.setattr(msa_jax.pallas, "_min_compute_capability", lambda: (9, 0))
    step = dict(op="paged_sparse_attention", head_dim=128, num_q_heads=64)
    for cache in ("bfloat16", "float8_e4m3fn"):
        assert impl.supports(_call(**step, kv_cache_dtype=cache, index_cache_dtype=cache)) is None
    assert "top_k=33" in impl.supports(_call(**step, config=dict(top_k=33)))
    reason = impl.supports(_call(**step | dict(head_dim=96)))
    assert "its paged attention is Pallas's kernel" in reason and "D=96" in reason
    assert "needs a CUDA GPU" in impl.supports(_call(platform="cpu"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fall-through")
def test_falls_through_on_cpu(rng):
    case = PagedCase(2, (70, 33), Hkv=2)
    arrays, kw, _, _ = build(rng, case)
    with pytest.raises(NotImplementedError, match="cuda: needs a CUDA GPU, the platform is cpu"):
        _select(arrays, kw, case.top_k, "cuda")
    got = _select(arrays, kw, case.top_k, ("cuda", "xla"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_select(arrays, kw, case.top_k, "xla")))


def _emulated_scan(index_q, index_k_pages, index_k_scale, page_table, local_page, *, top_k, splits,
                   pages_per_split, index_softmax_scale):
    """ops.paged_index_scan by its contract, in jnp: per split, each row's best top_k - 1 candidate
    pages of the split's range, unused entries (-inf, -1), in reverse rank order (the merge must
    not rely on the lists' order)."""
    B, T, Hkv, Di = index_q.shape
    P, page, _ = index_k_pages.shape
    max_pages, keep = page_table.shape[1], top_k - 1
    assert splits * pages_per_split >= max_pages and local_page.shape == (B, T) and keep >= 1
    phys = jnp.clip(page_table, 0, P - 1)
    keys = index_k_pages.astype(index_q.dtype)[phys]  # [B, M, page, Di]: FP8 -> index_q's dtype, exactly
    u = index_softmax_scale * jnp.einsum("btgd,bmpd->btgmp", index_q, keys, precision=jax.lax.Precision.HIGHEST,
                                         preferred_element_type=jnp.float32)
    if index_k_scale is not None:
        u = u * index_k_scale[phys][:, None, None]
    score = jnp.max(u, axis=-1).reshape(B, T * Hkv, 1, max_pages)
    page_id = jnp.arange(max_pages)
    local = jnp.repeat(local_page, Hkv, axis=1)[:, :, None, None]
    mine = (page_id // pages_per_split == jnp.arange(splits)[:, None]) & (page_id < local)  # [B, rows, splits, M]
    masked = jnp.where(mine, score, -jnp.inf)
    ids = jnp.broadcast_to(page_id, masked.shape)
    neg, ids = jax.lax.sort((-masked, ids), num_keys=2)
    pad = max(0, keep - max_pages)
    neg = jnp.pad(neg, [(0, 0)] * 3 + [(0, pad)], constant_values=jnp.inf)[..., :keep]
    ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, pad)])[..., :keep]
    ids = jnp.where(jnp.isinf(neg), -1, ids)
    return -neg[..., ::-1], ids[..., ::-1].astype(jnp.int32)


@pytest.mark.parametrize("target", [paged_scan.TARGET_PROGRAMS, 5], ids=["page-per-split", "pages-per-split"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
def test_glue_around_emulated_scan(rng, monkeypatch, case, target):
    """msa_jax.paged_select_blocks(implementation="cuda") with the kernel emulated equals the
    float64 oracle: the split plan, the list layout [B, T * Hkv, splits, top_k - 1], the merge."""
    monkeypatch.setattr(dispatch.implementation("cuda"), "supports", lambda call: None)
    monkeypatch.setattr(cuda_impl.ffi, "register_targets", lambda: True)
    monkeypatch.setattr(ops, "paged_index_scan", _emulated_scan)
    monkeypatch.setattr(paged_scan, "TARGET_PROGRAMS", target)
    arrays, kw, x64, okw = build(rng, case)
    got = _select(arrays, kw, case.top_k, "cuda")
    want = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.page, **okw)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("case", [PagedCase(1, (70, 33), Hkv=2), PagedCase(8, (90, 41), Hkv=2, kv_fp8=True,
                                                                         index_fp8=True)], ids=str)
def test_decode_step_glue_around_emulated_scan(rng, monkeypatch, case):
    """paged_sparse_attention(implementation="cuda") with the scan emulated: its selection, then
    Pallas's paged attention (interpret mode here), against the float64 oracle."""
    monkeypatch.setattr(dispatch.implementation("cuda"), "supports", lambda call: None)
    monkeypatch.setattr(cuda_impl.ffi, "register_targets", lambda: True)
    monkeypatch.setattr(ops, "paged_index_scan", _emulated_scan)
    arrays, kw, x64, okw = build(rng, case)
    res = step(arrays, kw, case, "cuda")
    want_bi = oracle.select_blocks(x64["index_q"], x64["index_k"], top_k=case.top_k, block_size=case.page, **okw)
    want_out, want_lse = oracle.attention(x64["q"], x64["k"], x64["v"], want_bi, block_size=case.page, **okw)
    np.testing.assert_array_equal(np.asarray(res.block_indices), want_bi)
    assert rel_err(res.out, want_out) < out_tol(case.dtype)
    assert_lse_close(res.lse, want_lse, 1e-4)


# ---- on the GPU --------------------------------------------------------------------------------

P128 = dict(Hq=4, Hkv=4, D=16, page=128)  # no K/V is read: G 1, a small D
GPU_CASES = (
    PagedCase(1, (40 * 128 + 17, 3 * 128 + 5, 0), Di=128, top_k=16, dtype="bfloat16", **P128),  # decode, a padding row
    PagedCase(8, (30 * 128 + 100, 9 * 128), Di=64, top_k=16, dtype="float16", **P128),
    PagedCase(16, (50 * 128, 20 * 128 + 7, 12 * 128), Di=128, top_k=32, dtype="bfloat16",
              q_offset=(50 * 128 - 10, -5, 12 * 128 - 16), **P128),  # queries past kv_length and before 0
    PagedCase(40, (25 * 128 + 3, 12 * 128 + 90), Di=64, top_k=8, dtype="bfloat16", **P128),  # 160 rows: 3 row tiles
    PagedCase(1, (2000 * 128 + 77,), Di=128, top_k=16, dtype="bfloat16", **P128),  # 2001 pages: 8 per split
    PagedCase(1, (45 * 128 + 9, 7 * 128 + 1), Di=128, top_k=16, dtype="bfloat16", index_fp8=True, **P128),
    PagedCase(16, (33 * 128 + 64, 18 * 128), Di=64, top_k=16, dtype="float16", index_fp8=True, **P128),
    PagedCase(20, (28 * 128, 40 * 128 + 3), Di=128, top_k=16, dtype="float16", index_fp8=True,
              q_offset=(28 * 128 - 25, 40 * 128 - 20), **P128),
    PagedCase(4, (26 * 128 + 50,), Di=64, top_k=32, dtype="bfloat16", index_fp8=True, **P128),
)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("one_split", [False, True], ids=["split", "one-split"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference(rng, monkeypatch, case, one_split):
    if one_split:  # one CTA per (row tile, batch row) walks every page: the ring wraps many times
        monkeypatch.setattr(paged_scan, "TARGET_PROGRAMS", 1)
    arrays, kw, x64, okw = build(rng, case)
    got = np.asarray(jax.block_until_ready(_select(arrays, kw, case.top_k, "cuda")))
    want = np.asarray(_select(arrays, kw, case.top_k, "xla"))
    B, T, K = len(case.lengths), case.T, case.top_k
    assert got.dtype == np.int32 and got.shape == (B, T, case.Hkv, K)
    lengths = np.asarray(case.lengths)
    q_offset = lengths - T if case.q_offset is None else np.asarray(case.q_offset)
    local, valid = query_blocks(q_offset, lengths, T, case.page)
    scores = block_scores(jnp.asarray(x64["index_q"], jnp.float32), jnp.asarray(x64["index_k"], jnp.float32),
                          block_size=case.page)
    check_selection(want, scores, local, K, 1e-5, "reference", valid=valid)  # the checker can fail
    check_selection(got, scores, local, K, TIE_TOL, "cuda", valid=valid)
    exact = np.mean(np.all(got == want, axis=-1))
    assert exact >= MIN_EXACT_ROWS, f"only {exact:.4%} of rows equal the reference's"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_constant_keys_follow_tie_rule(rng, fp8):
    """Every page scores the same: the smallest page ids win, in ascending order, then the local
    page, whatever physical pages hold them (one page per split: the merge decides every tie)."""
    page, K, T, Hkv, Di = 128, 16, 3, 2, 128
    length = 40 * page + 5
    table, P = msa_jax.make_page_table([length], page, permutation=rng.permutation(41))
    key = jnp.asarray(rng.standard_normal(Di), jnp.bfloat16)
    keys = jnp.broadcast_to(key, (P, page, Di))
    scale = None
    if fp8:
        keys, scale = msa_jax.quantize_fp8(keys.astype(jnp.float32))
    iq = jnp.asarray(rng.standard_normal((1, T, Hkv, Di)), jnp.bfloat16)
    got = msa_jax.paged_select_blocks(iq, keys, page_table=jnp.asarray(table), kv_length=length, top_k=K,
                                      index_k_scale=scale, implementation="cuda")
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(list(range(K - 1)) + [40], (1, T, Hkv, K)))


@pytest.mark.gpu
@requires_gpu
def test_default_on_hopper_is_the_cuda_kernel(rng):
    arrays, kw, _, _ = build(rng, GPU_CASES[0])
    text = jax.jit(lambda iq, ik, kw: msa_jax.paged_select_blocks(iq, ik, top_k=16, **kw)).lower(
        arrays["index_q"], arrays["index_k_pages"], kw).as_text()
    assert f"@{ops.PAGED_INDEX_SCAN}" in text  # the FFI target (Pallas's Triton call has another)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_step_matches_reference(rng, fp8):
    """paged_sparse_attention through `cuda` (this scan, then Pallas's paged attention) against
    `xla`'s: the selection (rows may differ only at near-ties, which test_matches_reference
    checks; here at most one in ten), and the output and lse against `xla`'s attention over the
    pages cuda selected; ragged rows, T 1 and 8."""
    page, Hkv, G, D, Di, K = 128, 2, 4, 128, 128, 16
    for T, lengths in ((1, (9000, 3000, 129)), (8, (5000, 700))):
        B = len(lengths)
        table, P = msa_jax.make_page_table(np.asarray(lengths), page, permutation=rng.permutation(
            sum(-(-n // page) for n in lengths)))
        normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
        k, v, ik = normal(P, page, Hkv, D), normal(P, page, Hkv, D), normal(P, page, Di)
        scales = dict(k_scale=None, v_scale=None, index_k_scale=None)
        if fp8:
            (k, scales["k_scale"]), (v, scales["v_scale"]) = msa_jax.quantize_fp8(k), msa_jax.quantize_fp8(v)
            ik, scales["index_k_scale"] = msa_jax.quantize_fp8(ik)
        q, iq = normal(B, T, Hkv * G, D), normal(B, T, Hkv, Di)
        run = lambda impl: msa_jax.paged_sparse_attention(  # noqa: E731
            q, k, v, iq, ik, page_table=jnp.asarray(table), kv_length=np.asarray(lengths, np.int32), top_k=K,
            implementation=impl, **scales)
        got, want = run("cuda"), run("xla")
        same = np.all(np.asarray(got.block_indices) == np.asarray(want.block_indices), axis=-1)
        assert same.mean() >= 0.9, f"{same.mean():.0%} of rows select as xla does"
        out, lse = msa_jax.paged_block_sparse_attention(
            q, k, v, got.block_indices, page_table=jnp.asarray(table), kv_length=np.asarray(lengths, np.int32),
            k_scale=scales["k_scale"], v_scale=scales["v_scale"], return_lse=True, implementation="xla")
        np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(out, np.float32), atol=2e-2, rtol=2e-2)
        np.testing.assert_allclose(np.asarray(got.lse), np.asarray(lse), atol=1e-3, rtol=1e-3)
