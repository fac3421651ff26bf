"""Pallas KL index-alignment loss and its gradient, KV-outer like the attention kernels.

Pass 1 (`_student_lse_kernel`, one program per work item): partial log-sum-exp of the
index scores u over each tile, merged per (query, group) into ilse.
Pass 2 (`_kl_kernel`, one program per key tile, looping over its queries in a fixed
order): the teacher P (group mean of exp(s - lse) over the G heads, via a small averaging
matmul) and the student R = exp(u - ilse) of the tile; it writes per (query, slot) the
partial sums of P log P - P u and of P, and, for the gradient, du = (R - P) * dkl chained
into a per-slot d index_q partial and the tile's d index_k. KL(P || R) per row is then
sum(P log P - P u) + ilse * sum(P).

Under differentiation (`kl_fwd`) both passes run once, with the gradient, and save the index
gradients for dkl = 1; `kl_bwd` scales them. Without (`kl_value`) pass 2 skips the gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import positions as pos_lib
from ..config import MSAConfig, Positions
from ..kv_outer import partials as kv_partials, worklist
from . import common

_NEG_INF = float("-inf")
_HI = jax.lax.Precision.HIGHEST


def _dot_nt(a, b, precision):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _student_lse_kernel(start_ref, count_ref, tile_ref, eq_ref, es_ref, iq_ref, ik_ref, hi_ref, m_ref, l_ref, *,
                        rows: int, student_rows: int, num_kv_heads: int, top_k: int, block_size: int,
                        scale: float, precision, dummy_row: int):
    g = pl.program_id(1)
    count = count_ref[0]

    @pl.when(count > 0)
    def _():
        start, tile = start_ref[0], tile_ref[0]
        r = jnp.arange(student_rows, dtype=jnp.int32)
        live = (r < rows) & (r < count)
        entry = start + jnp.where(live, r, 0)
        query, slot = eq_ref[entry], es_ref[entry]
        u = scale * _dot_nt(iq_ref[query * num_kv_heads + g, :], ik_ref[pl.ds(tile, block_size), :], precision)
        t = tile + jnp.arange(block_size, dtype=jnp.int32)[None, :]
        u = jnp.where(t <= hi_ref[query][:, None], u, _NEG_INF)
        m = jnp.max(u, axis=1)
        l = jnp.sum(jnp.exp(u - m[:, None]), axis=1)
        out_row = jnp.where(live, (query * top_k + slot) * num_kv_heads + g, dummy_row)
        m_ref[out_row] = m
        l_ref[out_row] = l


def _kl_kernel(start_ref, count_ref, tile_ref, eq_ref, es_ref, q_ref, k_ref, lse_ref, iq_ref, ik_ref, ilse_ref,
               hi_ref, dik_in, part_ref, psum_ref, diq_ref, dik_ref, *, rows: int, matrix_rows: int,
               student_rows: int, group: int, num_q_heads: int, num_kv_heads: int, top_k: int, block_size: int,
               scale: float, index_scale: float, precision, index_precision, dummy_row: int, dummy_key: int,
               dkl: float | None):
    del dik_in  # aliased to dik_ref: zeros where no program stores
    g = pl.program_id(1)
    count = count_ref[0]

    @pl.when(count > 0)
    def _():
        start, tile = start_ref[0], tile_ref[0]
        k = k_ref[pl.ds(tile, block_size), :]
        ik = ik_ref[pl.ds(tile, block_size), :]
        t = tile + jnp.arange(block_size, dtype=jnp.int32)
        m_idx = jnp.arange(matrix_rows, dtype=jnp.int32)
        rm, h = m_idx // group, m_idx % group
        r = jnp.arange(student_rows, dtype=jnp.int32)
        # Averaging matrix: student row r takes the mean of its query's G teacher rows.
        average = jnp.where((rm[None, :] == r[:, None]) & (rm[None, :] < rows), 1.0 / group, 0.0)

        def body(c, carry):
            dik, last = carry
            live_m = (rm < rows) & (c * rows + rm < count)
            entry_m = start + jnp.where(live_m, c * rows + rm, 0)
            query_m = eq_ref[entry_m]
            row_m = query_m * num_q_heads + g * group + h
            s = scale * _dot_nt(q_ref[row_m, :], k, precision)
            seen_m = t[None, :] <= jnp.where(live_m, hi_ref[query_m], -1)[:, None]
            p_heads = jnp.where(seen_m, jnp.exp(s - lse_ref[row_m][:, None]), 0.0)
            p = jax.lax.dot_general(average, p_heads, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32, precision=_HI)  # [student_rows, bk]

            live = (r < rows) & (c * rows + r < count)
            entry = start + jnp.where(live, c * rows + r, 0)
            query, slot = eq_ref[entry], es_ref[entry]
            seen = t[None, :] <= jnp.where(live, hi_ref[query], -1)[:, None]
            iq = iq_ref[query * num_kv_heads + g, :]
            u = jnp.where(seen, index_scale * _dot_nt(iq, ik, index_precision), 0.0)
            positive = seen & (p > 0)
            plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
            out_row = jnp.where(live, (query * top_k + slot) * num_kv_heads + g, dummy_row)
            part_ref[out_row] = jnp.sum(plogp - p * u, axis=1)
            psum_ref[out_row] = jnp.sum(p, axis=1)
            if dkl is not None:
                ilse = ilse_ref[query * num_kv_heads + g]
                student = jnp.where(seen, jnp.exp(u - ilse[:, None]), 0.0)
                du = (student - p) * dkl
                diq_ref[out_row, :] = index_scale * jax.lax.dot_general(
                    du.astype(ik.dtype), ik, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                    precision=index_precision,
                )
                dik = dik + index_scale * jax.lax.dot_general(
                    du.astype(iq.dtype), iq, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                    precision=index_precision,
                )
            return dik, jnp.maximum(last, jnp.max(jnp.where(live, hi_ref[query], -1)))

        zeros = jnp.zeros((block_size, ik.shape[1]), jnp.float32)
        dik, last = jax.lax.fori_loop(0, pl.cdiv(count, rows), body, (zeros, jnp.int32(-1)))
        if dkl is not None:
            dik_ref[jnp.where(t <= last, t, dummy_key), :] = dik


def _run(q, k, index_q, index_k, block_indices, lse, positions: Positions, cfg: MSAConfig, with_grad: bool, *,
         interpret: bool):
    """(kl_sum f32 scalar, d index_q f32 [B, T, Hkv, Di], d index_k f32 per kv head
    [B, S, Hkv, Di]); the gradients are for dkl = 1 and are None unless with_grad."""
    B, T, Hq, D = q.shape
    S, Hkv, Di = k.shape[1], k.shape[2], index_k.shape[-1]
    G, K, bk = Hq // Hkv, block_indices.shape[3], cfg.block_size
    packed = positions.segment_ids is not None
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    if cfg.dense:  # dense warm-up: the support is every visible block
        K = -(-S // bk)
        block_indices = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, T, Hkv, K))
    tiles = common.attention_tiles(G, D)
    student_rows = common.next_power_of_2(max(16, tiles.rows))
    kp, ikp = common.pad_keys(k, bk), common.pad_keys(index_k, bk)
    s_pad = kp.shape[1]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    shared = dict(top_k=K, block_size=bk, num_kv_heads=Hkv, rows=tiles.rows, student_rows=student_rows)
    index_scale, index_precision = cfg.index_scale(Di), common.dot_precision(index_q.dtype)
    params = common.compiler_params(tiles)

    chunk = kv_partials.query_chunk(T, K * Hkv * max(G * D, Di) * 4)
    kl_total = jnp.zeros((), jnp.float32)
    # index_k is one head shared by all groups: each group's programs add into their own copy.
    diqs, dik = [], jnp.zeros((B, s_pad + 1, Hkv, Di), jnp.float32)
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        Tc = sl.stop - sl.start
        n_out = Tc * K * Hkv  # one row per (query, slot, group), plus a dummy row
        item_spec = pl.BlockSpec((None, None, 1), lambda b, g, i: (b, g, i))
        entry_spec = pl.BlockSpec((None, None, Tc * K), lambda b, g, i: (b, g, 0))
        full = lambda *shape: pl.BlockSpec((None, *shape), lambda b, g, i: (b,) + (0,) * len(shape))
        iq_c = index_q[:, sl].reshape(B, Tc * Hkv, Di)
        coords = (qpos[:, sl], doc[:, sl], valid[:, sl])
        unflat = lambda x: jnp.moveaxis(x[:, :n_out].reshape(B, Tc, K, Hkv, *x.shape[2:]), 3, 2)  # [B,Tc,Hkv,K,..]

        # Pass 1: ilse per (query, group) over the support.
        wl = worklist.build(block_indices[:, sl], *coords, kv_len=S, block_size=bk, rows=tiles.rows, packed=packed)
        m, l = pl.pallas_call(
            functools.partial(_student_lse_kernel, scale=index_scale, precision=index_precision,
                              dummy_row=n_out, **shared),
            grid=(B, Hkv, wl.item_count.shape[-1]),
            in_specs=[item_spec] * 3 + [entry_spec] * 2 + [full(Tc * Hkv, Di), full(s_pad, Di), full(Tc)],
            out_specs=[full(n_out + 1)] * 2,
            out_shape=[jax.ShapeDtypeStruct((B, n_out + 1), jnp.float32)] * 2,
            compiler_params=params, interpret=interpret, name="msa_kl_student_lse",
        )(wl.item_start, wl.item_count, wl.item_tile, wl.entry_query, wl.entry_slot, iq_c, ikp, hi[:, sl])
        ok = wl.entry_ok  # [B, Tc, Hkv, K]
        ilse = kv_partials.merge_lse(unflat(m), unflat(l), ok)  # [B, Tc, Hkv]

        # Pass 2: one program per tile, all its queries in order.
        per_group_dik = pl.BlockSpec((None, s_pad + 1, None, Di), lambda b, g, i: (b, 0, g, 0))
        wl2 = worklist.build(block_indices[:, sl], *coords, kv_len=S, block_size=bk, rows=Tc * K, packed=packed)
        kernel = functools.partial(
            _kl_kernel, matrix_rows=tiles.matrix_rows, group=G, num_q_heads=Hq, scale=cfg.scale(D),
            index_scale=index_scale, precision=common.dot_precision(q.dtype), index_precision=index_precision,
            dummy_row=n_out, dummy_key=s_pad, dkl=1.0 if with_grad else None, **shared,
        )
        part, psum, diq_part, dik_c = pl.pallas_call(
            kernel,
            grid=(B, Hkv, wl2.item_count.shape[-1]),
            in_specs=[item_spec] * 3 + [entry_spec] * 2 + [
                full(Tc * Hq, D), pl.BlockSpec((None, s_pad, None, D), lambda b, g, i: (b, 0, g, 0)),
                full(Tc * Hq), full(Tc * Hkv, Di), full(s_pad, Di), full(Tc * Hkv), full(Tc),
                per_group_dik],
            out_specs=[full(n_out + 1), full(n_out + 1), full(n_out + 1, Di), per_group_dik],
            out_shape=[jax.ShapeDtypeStruct((B, n_out + 1), jnp.float32)] * 2 + [
                jax.ShapeDtypeStruct((B, n_out + 1, Di), jnp.float32),
                jax.ShapeDtypeStruct(dik.shape, jnp.float32)],
            input_output_aliases={12: 3},
            compiler_params=params, interpret=interpret, name="msa_kl",
        )(wl2.item_start, wl2.item_count, wl2.item_tile, wl2.entry_query, wl2.entry_slot,
          q[:, sl].reshape(B, Tc * Hq, D), kp, lse_safe[:, sl].reshape(B, Tc * Hq), iq_c, ikp,
          jnp.where(jnp.isfinite(ilse), ilse, 0.0).reshape(B, Tc * Hkv), hi[:, sl], jnp.zeros_like(dik))
        # A program stores (not adds) its tile's rows: each chunk starts from zeros and the
        # chunks' contributions are summed here, as in attention_bwd.
        dik = dik + dik_c
        ok2 = wl2.entry_ok
        row_ok = jnp.isfinite(ilse)  # non-empty support
        kl_rows = jnp.sum(jnp.where(ok2, unflat(part), 0.0), -1) + jnp.where(row_ok, ilse, 0.0) * jnp.sum(
            jnp.where(ok2, unflat(psum), 0.0), -1)
        kl_total = kl_total + jnp.sum(jnp.where(row_ok, kl_rows, 0.0))
        if with_grad:
            diqs.append(jnp.sum(jnp.where(ok2[..., None], unflat(diq_part), 0.0), axis=3))
    if not with_grad:
        return kl_total, None, None
    return kl_total, jnp.concatenate(diqs, axis=1), dik[:, :S]


def kl_value(q, k, index_q, index_k, block_indices, lse, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """float32 scalar: sum over valid (query, group) rows of KL(P || R)."""
    return _run(q, k, index_q, index_k, block_indices, lse, positions, cfg, False, interpret=interpret)[0]


def kl_fwd(q, k, index_q, index_k, block_indices, lse, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """(value, saved) under differentiation: both passes run once, with the gradient, and
    `saved` holds the gradients for dkl = 1 (d index_k per kv head, so that a head shard's
    part stays its own); kl_bwd scales them."""
    value, diq, dik = _run(q, k, index_q, index_k, block_indices, lse, positions, cfg, True, interpret=interpret)
    return value, (diq, dik)

