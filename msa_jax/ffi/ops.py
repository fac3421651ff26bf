"""`jax.ffi.ffi_call` wrappers of the CUDA handlers (cuda/ffi/*.cc), one per target.

Each takes validated, canonical arrays (the dispatcher's contract) and returns what its
handler writes; the handler re-checks shapes and dtypes, so a mismatch here is an
`ffi::Error`, never an out-of-bounds access. The targets must be registered first
(`msa_jax.ffi.register_targets`). vmap runs the call once per mapped element
("sequential"): the kernels take one batch axis, which vmap's other methods would not fold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The FFI target names; cuda/ffi/module.cc registers exactly these (tests/test_ffi_loader.py).
SELECT_BLOCKS = "msa_select_blocks"
SPARSE_ATTENTION_PARTIALS = "msa_sparse_attention_partials"
SPARSE_ATTENTION_BWD = "msa_sparse_attention_bwd"
KL_PARTIALS = "msa_kl_partials"
KL_BWD = "msa_kl_bwd"
DENSE_KL = "msa_dense_kl"
PAGED_INDEX_SCAN = "msa_paged_index_scan"
TARGETS = (SELECT_BLOCKS, SPARSE_ATTENTION_PARTIALS, SPARSE_ATTENTION_BWD, KL_PARTIALS, KL_BWD, DENSE_KL,
           PAGED_INDEX_SCAN)


def select_blocks(index_q, index_k, q_offset, kv_length, doc, *, top_k: int, block_size: int,
                  index_softmax_scale: float):
    """The fused indexer (target "msa_select_blocks").

    Args:
      index_q: bf16 [B, T, Hkv, Di]; index_k: bf16 [B, S, Di].
      q_offset, kv_length: int32 [B] (spec, "Positions").
      doc: int32 [B, T], the first key of each query's document (`positions.query_coords`;
        zeros without packed documents): block ids are counted from it.
      top_k, block_size, index_softmax_scale: the spec's K, Bk, si.

    Returns:
      int32 [B, T, Hkv, top_k]: the spec's selection rows.
    """
    B, T, Hkv, _ = index_q.shape
    out = jax.ShapeDtypeStruct((B, T, Hkv, top_k), jnp.int32)
    call = jax.ffi.ffi_call(SELECT_BLOCKS, out, vmap_method="sequential")
    return call(index_q, index_k, q_offset.astype(jnp.int32), kv_length.astype(jnp.int32), doc.astype(jnp.int32),
                top_k=np.int32(top_k), block_size=np.int32(block_size),
                index_softmax_scale=np.float32(index_softmax_scale))


def paged_index_scan(index_q, index_k_pages, index_k_scale, page_table, local_page, *, top_k: int, splits: int,
                     pages_per_split: int, index_softmax_scale: float):
    """The paged index scan's per-split lists (target "msa_paged_index_scan").

    Args:
      index_q: bf16 or fp16 [B, T, Hkv, Di].
      index_k_pages: [P, 128, Di] in index_q's dtype, or float8_e4m3fn with index_k_scale
        float32 [P, 128]; index_k_scale None otherwise.
      page_table: int32 [B, max_pages] (entries are clamped into [0, P) when read).
      local_page: int32 [B, T], each query's local page, -1 for padding queries.
      top_k, index_softmax_scale: the spec's K (2..32) and si.
      splits, pages_per_split: split s scans logical pages [s * pages_per_split,
        (s + 1) * pages_per_split); splits * pages_per_split >= max_pages.

    Returns:
      (scores float32, ids int32), each [B, T * Hkv, splits, top_k - 1], row r = t * Hkv + g:
      per split, the row's best top_k - 1 candidate pages (j < local page) of the split's range,
      unranked, score si * max over the page's keys of <index_q, index_k> (times the token's
      scale for FP8); unused entries (-inf, -1).
    """
    B, T, Hkv, _ = index_q.shape
    shape = (B, T * Hkv, splits, top_k - 1)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    call = jax.ffi.ffi_call(PAGED_INDEX_SCAN, out, vmap_method="sequential")
    # No scales with keys in index_q's dtype: an empty buffer (the handler checks which it got).
    scale = jnp.zeros((0,), jnp.float32) if index_k_scale is None else index_k_scale
    return call(index_q, index_k_pages, scale, page_table, local_page.astype(jnp.int32), top_k=np.int32(top_k),
                splits=np.int32(splits), pages_per_split=np.int32(pages_per_split),
                index_softmax_scale=np.float32(index_softmax_scale))


def sparse_attention_partials(q, k, v, last_visible, work, *, q_base: int, top_k: int, block_size: int,
                              softmax_scale: float):
    """KV-outer slot partials of one query chunk (target "msa_sparse_attention_partials").

    Args:
      q: [B, T, Hq, D] (all queries); k, v: [B, S, Hkv, D]; bf16 or fp16, one dtype.
      last_visible: int32 [B, T], the last key each query may see (-1: none).
      work: a `msa_jax.kv_outer.worklist.WorkList` of the chunk's queries, rows a multiple of
        64 // G (the kernel's query tokens per step).
      q_base: first query of the chunk; top_k, block_size, softmax_scale: the spec's K, Bk, s.

    Returns:
      (out [B, R, D] in q's dtype, lse float32 [B, R]), R = chunk * top_k * Hq, row
      (query * top_k + slot) * Hq + head; rows of entries the work list leaves out are not
      written (combine masks them by work.entry_ok).
    """
    B, _, Hq, D = q.shape
    rows = work.entry_query.shape[-1] * Hq
    out = (jax.ShapeDtypeStruct((B, rows, D), q.dtype), jax.ShapeDtypeStruct((B, rows), jnp.float32))
    call = jax.ffi.ffi_call(SPARSE_ATTENTION_PARTIALS, out, vmap_method="sequential")
    return call(q, k, v, last_visible.astype(jnp.int32), work.entry_query, work.entry_slot, work.item_start,
                work.item_count, work.item_tile, q_base=np.int32(q_base), top_k=np.int32(top_k),
                block_size=np.int32(block_size), softmax_scale=np.float32(softmax_scale))


def sparse_attention_bwd(q, k, v, dout, lse, delta, last_visible, work, *, q_base: int, top_k: int,
                         block_size: int, softmax_scale: float, deterministic: bool):
    """KV-outer backward of one query chunk (target "msa_sparse_attention_bwd").

    Args:
      q, dout: [B, T, Hq, D] (all queries); k, v: [B, S, Hkv, D]; bf16 or fp16, one dtype.
      lse, delta: float32 [B, T, Hq]: the forward's lse (finite wherever an entry is live)
        and rowsum(dout * out) - dlse.
      last_visible: int32 [B, T], the last key each query may see (-1: none).
      work: the chunk's `msa_jax.kv_outer.worklist.WorkList`, rows a multiple of 64 // G; with
        deterministic=True it must hold one work item per (key tile, kv head).
      q_base: first query of the chunk; top_k, block_size, softmax_scale: the spec's K, Bk, s.
      deterministic: write dq as slot partials (no atomics) and add dk / dv in a fixed order.

    Returns:
      (dq, dk, dv) float32: dk, dv [B, S, Hkv, D], this chunk's sums; dq [B, T * Hq, D] rows
      (query * Hq + head) of the chunk's queries summed over their tiles (other rows 0), or
      with deterministic=True [B, chunk * top_k * Hq, D] slot partials, row
      (query * top_k + slot) * Hq + head (0 where no live entry).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    dq_rows = work.entry_query.shape[-1] * Hq if deterministic else T * Hq
    out = (jax.ShapeDtypeStruct((B, dq_rows, D), jnp.float32),
           jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.float32),
           jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.float32))
    call = jax.ffi.ffi_call(SPARSE_ATTENTION_BWD, out, vmap_method="sequential")
    return call(q, k, v, dout, lse.astype(jnp.float32), delta.astype(jnp.float32),
                last_visible.astype(jnp.int32), work.entry_query, work.entry_slot, work.item_start,
                work.item_count, work.item_tile, q_base=np.int32(q_base), top_k=np.int32(top_k),
                block_size=np.int32(block_size), softmax_scale=np.float32(softmax_scale),
                deterministic=bool(deterministic))


def kl_partials(q, k, lse, index_q, index_k, last_visible, work, *, q_base: int, top_k: int, block_size: int,
                softmax_scale: float, index_softmax_scale: float, student: bool = False):
    """The KL value pass of one query chunk (target "msa_kl_partials"); with student=True the
    student-only pass (the student's log-sum-exp partials alone; q, k and lse are not read).

    Args:
      q: [B, T, Hq, D] (all queries); k: [B, S, Hkv, D]; bf16 or fp16, one dtype.
      lse: float32 [B, T, Hq], the teacher's (finite wherever an entry is live).
      index_q: bf16 [B, T, Hkv, Di]; index_k: bf16 [B, S, Di].
      last_visible: int32 [B, T], the last key each query may see (-1: none).
      work: the chunk's `WorkList`, rows a multiple of 64 // G (student: of 64).
      q_base: first query of the chunk; top_k, block_size, softmax_scale, index_softmax_scale:
        the spec's K, Bk, s, si.

    Returns:
      float32 [B, chunk * top_k, Hkv, 2, 4]: per entry (query * top_k + slot), kv head and key
      half of its tile, (max u, sum exp(u - max), sum P log P - P u, sum P) over the half's
      visible keys, P the group-mean teacher and u = si <index_q, index_k> (student: the last
      two are 0); zero for entries the work list leaves out.
    """
    B, Hkv, E = work.entry_query.shape
    out = jax.ShapeDtypeStruct((B, E, Hkv, 2, 4), jnp.float32)
    call = jax.ffi.ffi_call(KL_PARTIALS, out, vmap_method="sequential")
    return call(q, k, lse.astype(jnp.float32), index_q, index_k, last_visible.astype(jnp.int32), work.entry_query,
                work.entry_slot, work.item_start, work.item_count, work.item_tile, q_base=np.int32(q_base),
                top_k=np.int32(top_k), block_size=np.int32(block_size), softmax_scale=np.float32(softmax_scale),
                index_softmax_scale=np.float32(index_softmax_scale), student=bool(student))


def kl_bwd(q, k, lse, index_q, index_k, ilse, last_visible, work, *, q_base: int, top_k: int, block_size: int,
           softmax_scale: float, index_softmax_scale: float, deterministic: bool):
    """The KL gradient pass of one query chunk for dkl = 1, with the value's terms (target
    "msa_kl_bwd").

    Args: as `kl_partials`, plus ilse float32 [B, T, Hkv], the student's log-sum-exp over the
      whole support (finite wherever an entry is live); with deterministic=True the work list
      must hold one work item per (key tile, kv head).

    Returns:
      (d_index_q, d_index_k, value_terms) float32: d_index_k [B, S, Hkv, Di], each kv head's
      share (the caller sums over Hkv); d_index_q [B, T, Hkv, Di] summed over tiles (rows of
      other chunks 0), or with deterministic=True [B, chunk * top_k, Hkv, Di] slot partials;
      value_terms with d_index_q's rows, [.., Hkv, 2]: (sum P log P - P u, sum P) over the
      row's support, so that KL(row) = terms[0] + ilse * terms[1].
    """
    B, T, Hkv, Di = index_q.shape
    S, E = k.shape[1], work.entry_query.shape[-1]
    rows = E if deterministic else T
    out = (jax.ShapeDtypeStruct((B, rows, Hkv, Di), jnp.float32),
           jax.ShapeDtypeStruct((B, S, Hkv, Di), jnp.float32),
           jax.ShapeDtypeStruct((B, rows, Hkv, 2), jnp.float32))
    call = jax.ffi.ffi_call(KL_BWD, out, vmap_method="sequential")
    return call(q, k, lse.astype(jnp.float32), index_q, index_k, ilse.astype(jnp.float32),
                last_visible.astype(jnp.int32), work.entry_query, work.entry_slot, work.item_start, work.item_count,
                work.item_tile, q_base=np.int32(q_base), top_k=np.int32(top_k), block_size=np.int32(block_size),
                softmax_scale=np.float32(softmax_scale), index_softmax_scale=np.float32(index_softmax_scale),
                deterministic=bool(deterministic))


def dense_kl(q, k, lse, index_q, index_k, ilse, *, softmax_scale: float, index_softmax_scale: float):
    """The KL over every visible key in dense mode with plain causal positions (T == S, query t
    at key t, every key present, one document), for dkl = 1, without work lists (target
    "msa_dense_kl").

    Args:
      q: [B, T, Hq, D]; k: [B, T, Hkv, D]; index_q: [B, T, Hkv, Di]; index_k: [B, T, Di]; one
        dtype, bf16 or fp16.
      lse: float32 [B, T, Hq], the teacher's log-sum-exp over keys 0..t; ilse: float32
        [B, T, Hkv], the student's.
      softmax_scale, index_softmax_scale: the spec's s and si.

    Returns:
      (value [B, Hkv, ceil(T / 128)], d_index_q [B, T, Hkv, Di], d_index_k [B, T, Hkv, Di]),
      float32: the value's shares per key tile (their sum is the unnormalised KL sum) and the
      gradients for dkl = 1, d_index_k per kv head (the caller sums over Hkv).
    """
    B, T, Hkv, Di = index_q.shape
    out = (jax.ShapeDtypeStruct((B, Hkv, -(-T // 128)), jnp.float32),
           jax.ShapeDtypeStruct((B, T, Hkv, Di), jnp.float32),
           jax.ShapeDtypeStruct((B, T, Hkv, Di), jnp.float32))
    call = jax.ffi.ffi_call(DENSE_KL, out, vmap_method="sequential")
    return call(q, k, lse.astype(jnp.float32), index_q, index_k, ilse.astype(jnp.float32),
                softmax_scale=np.float32(softmax_scale), index_softmax_scale=np.float32(index_softmax_scale))
