"""The public ops. Each: canonicalise arguments -> validate -> dispatch.

Layouts follow `jax.nn.dot_product_attention` (BTNH); the function computed is
`shared/spec/msa.md` ("the spec"). Every op takes `implementation`: None (fastest available
for the platform), "xla", "pallas", "cuda", or a sequence tried in order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from . import autodiff, dispatch, positions as pos_lib, validation
from .config import CallInfo, IndexPages, KVPages, MSAConfig, Positions

_sg = jax.lax.stop_gradient

# Dimension letters for dispatch.shard_local: B batch, H heads (sharded alike), others whole.
_Q, _KV, _IQ, _IK, _BI = "BTHD", "BSHD", "BTHD", "BSD", "BTHK"
_POS = ("B", "B", "BT")


class MSAOutput(NamedTuple):
    """Result of `sparse_attention`.

    out: [B, T, Hq, D] in q's dtype.
    kl_loss: float32 scalar, the spec's KL index-alignment loss times kl_coeff.
    block_indices: int32 [B, T, Hkv, top_k], the index branch's selection.
    lse: float32 [B, T, Hq], natural-log normaliser of each row (-inf for padding rows).
    """

    out: jax.Array
    kl_loss: jax.Array
    block_indices: jax.Array
    lse: jax.Array


def _prepare(op, q, k, v, index_q, index_k, q_offset, kv_length, segment_ids, implementation, **options):
    q, k = validation.as_array(q, "q"), validation.as_array(k, "k")
    v = None if v is None else validation.as_array(v, "v")
    B, T, S, Hq, Hkv, D = validation.check_qkv(q, k, v)
    Di, index_dtype = None, None
    if index_q is not None:
        index_q = validation.as_array(index_q, "index_q")
        index_k = validation.as_array(index_k, "index_k")
        Di = validation.check_index(index_q, index_k, B=B, T=T, S=S, Hkv=Hkv)
        index_dtype = str(index_q.dtype)
    q_offset, kv_length, segment_ids = validation.check_positions(
        q_offset, kv_length, segment_ids, B=B, T=T, S=S
    )
    validation.check_implementation(implementation)
    cfg = MSAConfig(**options)
    positions = pos_lib.canonicalize(q_offset, kv_length, segment_ids, batch=B, q_len=T, kv_len=S)
    platform = jax.default_backend()
    plain = pos_lib.is_plain_causal(q_offset, kv_length, segment_ids, q_len=T, kv_len=S)
    call = CallInfo(op, B, T, S, Hq, Hkv, D, Di, str(q.dtype), index_dtype, segment_ids is not None, cfg, platform,
                    plain_causal=plain)
    names = dispatch.resolve(implementation, platform)
    return q, k, v, index_q, index_k, cfg, positions, call, names


def _normalise_kl(kl_sum, cfg: MSAConfig, positions: Positions, q_len: int, num_kv_heads: int):
    """kl_coeff / (Hkv * N) * sum, and 0 when there is no valid query (N = 0)."""
    n = pos_lib.num_valid_queries(positions, q_len)
    scale = cfg.kl_coeff / (num_kv_heads * jnp.maximum(n, 1).astype(jnp.float32))
    return jnp.where(n > 0, kl_sum * scale, 0.0).astype(jnp.promote_types(kl_sum.dtype, jnp.float32))


def sparse_attention(
    q,
    k,
    v,
    index_q,
    index_k,
    *,
    top_k: int = 16,
    block_size: int = 128,
    mode: str = "sparse",
    q_offset=None,
    kv_length=None,
    segment_ids=None,
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    kl_coeff: float = 1.0,
    deterministic: bool = False,
    implementation=None,
) -> MSAOutput:
    """MiniMax Sparse Attention: index branch, block selection, main branch and KL loss.

    Args:
      q: [B, T, Hq, D] float (bf16, fp16 or fp32).
      k, v: [B, S, Hkv, D], q's dtype; Hq must be a multiple of Hkv (G = Hq // Hkv).
      index_q: [B, T, Hkv, Di], one index query head per GQA group.
      index_k: [B, S, Di], one index key head shared by all groups; index_q's dtype.
      top_k: blocks kept per (query, group), the query's own (local) block included.
      block_size: keys per block.
      mode: "sparse", or "dense" for the indexer warm-up (attention and KL over every
        visible key; `block_indices` still reports the selection).
      q_offset: None (= kv_length - T; 0 with segment_ids), an int, or int32 [B]: key
        position of query 0. Must lie in [-T, S].
      kv_length: None (= S), an int, or int32 [B] in [0, S]: keys that exist per row.
      segment_ids: None or int [B, T] (requires T == S and q_offset None): packed documents,
        each a contiguous run of equal ids, with positions and block grid restarting there.
      softmax_scale, index_softmax_scale: None for 1/sqrt(D) and 1/sqrt(Di).
      kl_coeff: multiplier of the KL loss.
      deterministic: make the gradients bitwise repeatable from call to call. Only the
        cuda backward needs it: by default it adds with atomics, 1.3x faster on the H200
        (config A, 32K-128K); xla and pallas are always deterministic.
      implementation: None, "xla", "pallas", "cuda", or a sequence of those tried in order.

    Returns:
      MSAOutput(out, kl_loss, block_indices, lse). Gradients: out and lse reach q, k, v
      only; kl_loss reaches index_q and index_k only; block_indices carry none. Padding
      queries (position < 0 or >= kv_length) give out 0, lse -inf, block_indices -1.

    Raises:
      TypeError, ValueError: malformed arguments (the message names the argument).
      NotImplementedError: no requested implementation can serve the call (with reasons).
    """
    v, index_q = validation.as_array(v, "v"), validation.as_array(index_q, "index_q")
    q, k, v, index_q, index_k, cfg, pos, call, names = _prepare(
        "sparse_attention", q, k, v, index_q, index_k, q_offset, kv_length, segment_ids, implementation,
        top_k=top_k, block_size=block_size, mode=mode, softmax_scale=softmax_scale,
        index_softmax_scale=index_softmax_scale, kl_coeff=kl_coeff, deterministic=deterministic,
    )

    def serve(impl):
        def body(q, k, v, index_q, index_k, q_offset, kv_length, segment_ids):
            p = Positions(q_offset, kv_length, segment_ids)
            bi = impl.select_blocks(_sg(index_q), _sg(index_k), p, cfg)
            out, lse = autodiff.main_branch(impl, cfg, call.plain_causal, q, k, v, bi, *p)
            kl = autodiff.kl_sum(impl, cfg, call.plain_causal, _sg(q), _sg(k), index_q, index_k, bi, _sg(lse), *p)
            return out, lse, bi, kl

        return dispatch.shard_local(
            body, (q, k, v, index_q, index_k, *pos), (_Q, _KV, _KV, _IQ, _IK, *_POS),
            (_Q, "BTH", _BI, ""), summed_outputs=(3,),
        )

    out, lse, bi, kl = dispatch.run("sparse_attention", call, names, serve)
    kl_loss = _normalise_kl(kl, cfg, pos, q.shape[1], k.shape[2])
    return MSAOutput(out, kl_loss, bi, lse)


def select_blocks(
    index_q,
    index_k,
    *,
    top_k: int = 16,
    block_size: int = 128,
    q_offset=None,
    kv_length=None,
    segment_ids=None,
    index_softmax_scale: float | None = None,
    implementation=None,
):
    """The index branch alone: int32 [B, T, Hkv, top_k] selection rows of the spec.

    Each row holds the chosen non-local blocks by descending max-pooled index score (ties:
    smaller id first), then the local block, then -1 for unused slots; padding rows are all
    -1. Arguments as in `sparse_attention` (index_q [B, T, Hkv, Di], index_k [B, S, Di]).
    No gradient flows through the selection.
    """
    index_q = validation.as_array(index_q, "index_q")
    index_k = validation.as_array(index_k, "index_k")
    validation.check_rank(index_q, "index_q", 4, "[B, T, Hkv, Di]")
    validation.check_rank(index_k, "index_k", 3, "[B, S, Di]")
    validation.check_floating(index_q, "index_q")
    B, T, Hkv, _ = index_q.shape
    S = index_k.shape[1]
    # The main branch is absent: stand-ins of the right static shape let one validator and
    # one CallInfo serve all ops (nothing reads their values).
    q_like = jax.ShapeDtypeStruct((B, T, Hkv, 1), index_q.dtype)
    k_like = jax.ShapeDtypeStruct((B, S, Hkv, 1), index_q.dtype)
    _, _, _, index_q, index_k, cfg, pos, call, names = _prepare(
        "select_blocks", q_like, k_like, None, index_q, index_k, q_offset, kv_length, segment_ids,
        implementation, top_k=top_k, block_size=block_size, index_softmax_scale=index_softmax_scale,
    )

    def serve(impl):
        def body(index_q, index_k, q_offset, kv_length, segment_ids):
            return (impl.select_blocks(_sg(index_q), _sg(index_k), Positions(q_offset, kv_length, segment_ids), cfg),)

        return dispatch.shard_local(body, (index_q, index_k, *pos), (_IQ, _IK, *_POS), (_BI,))[0]

    return dispatch.run("select_blocks", call, names, serve)


def block_sparse_attention(
    q,
    k,
    v,
    block_indices,
    *,
    block_size: int = 128,
    q_offset=None,
    kv_length=None,
    segment_ids=None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    implementation=None,
):
    """The main branch alone: exact softmax attention over the blocks in block_indices.

    Args:
      q, k, v: as in `sparse_attention`.
      block_indices: int32 [B, T, Hkv, K], any K >= 1. Each row is a set: order does not
        matter, -1 and ids outside [0, ceil(S / block_size)) are ignored, causality is
        applied per key. Duplicate ids violate the contract (see `check_block_indices`).
      return_lse: also return lse float32 [B, T, Hq].
      deterministic: bitwise-repeatable gradients (see `sparse_attention`).

    Returns:
      out [B, T, Hq, D] in q's dtype, or (out, lse) if return_lse. Gradients reach q, k, v.
    """
    v = validation.as_array(v, "v")
    q, k, v, _, _, cfg, pos, call, names = _prepare(
        "block_sparse_attention", q, k, v, None, None, q_offset, kv_length, segment_ids, implementation,
        block_size=block_size, softmax_scale=softmax_scale, deterministic=deterministic,
    )
    block_indices = validation.check_block_indices_shape(block_indices, B=q.shape[0], T=q.shape[1], Hkv=k.shape[2])

    def serve(impl):
        def body(q, k, v, block_indices, q_offset, kv_length, segment_ids):
            return autodiff.attention(impl, cfg, q, k, v, block_indices, q_offset, kv_length, segment_ids)

        return dispatch.shard_local(
            body, (q, k, v, block_indices, *pos), (_Q, _KV, _KV, _BI, *_POS), (_Q, "BTH")
        )

    out, lse = dispatch.run("block_sparse_attention", call, names, serve)
    return (out, lse) if return_lse else out


def index_kl_loss(
    q,
    k,
    index_q,
    index_k,
    block_indices,
    *,
    block_size: int = 128,
    mode: str = "sparse",
    q_offset=None,
    kv_length=None,
    segment_ids=None,
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    kl_coeff: float = 1.0,
    deterministic: bool = False,
    implementation=None,
):
    """The KL index-alignment loss alone: float32 scalar.

    kl_coeff / (Hkv * N) * sum over valid queries and groups of KL(P || R), where P is the
    group-mean attention of q over the support (block_indices, or every visible key in
    "dense" mode) and R the softmax of the index scores over the same support. Gradients
    reach index_q and index_k only (q and k are the detached teacher). deterministic: as in
    `sparse_attention` (the cuda gradient adds with atomics unless it is set).
    """
    index_q = validation.as_array(index_q, "index_q")
    q, k, _, index_q, index_k, cfg, pos, call, names = _prepare(
        "index_kl_loss", q, k, None, index_q, index_k, q_offset, kv_length, segment_ids, implementation,
        block_size=block_size, mode=mode, softmax_scale=softmax_scale,
        index_softmax_scale=index_softmax_scale, kl_coeff=kl_coeff, deterministic=deterministic,
    )
    block_indices = validation.check_block_indices_shape(block_indices, B=q.shape[0], T=q.shape[1], Hkv=k.shape[2])

    def serve(impl):
        def body(q, k, index_q, index_k, block_indices, q_offset, kv_length, segment_ids):
            p = Positions(q_offset, kv_length, segment_ids)
            lse = autodiff.teacher_lse(impl, cfg, call.plain_causal, _sg(q), _sg(k), block_indices, p)
            return (autodiff.kl_sum(impl, cfg, call.plain_causal, _sg(q), _sg(k), index_q, index_k, block_indices, lse,
                                    *p),)

        return dispatch.shard_local(
            body, (q, k, index_q, index_k, block_indices, *pos), (_Q, _KV, _IQ, _IK, _BI, *_POS),
            ("",), summed_outputs=(0,),
        )[0]

    kl = dispatch.run("index_kl_loss", call, names, serve)
    return _normalise_kl(kl, cfg, pos, q.shape[1], k.shape[2])


def check_block_indices(
    block_indices,
    *,
    num_keys: int,
    block_size: int = 128,
    q_offset=None,
    kv_length=None,
    segment_ids=None,
):
    """Checked path for a concrete block_indices: raises on malformed rows, else returns it.

    Rejected (ValueError, naming the first offending (b, i, g) and its row): entries < -1
    or >= ceil(num_keys / block_size); a block id twice in one row; a block past the query's
    local block (it holds no visible key); any non-(-1) entry in a padding row. Positions
    as in `sparse_attention`, with num_keys = S.

    Raises:
      TypeError: wrong dtype, or a traced (non-concrete) array: call this outside jit.
    """
    block_indices = validation.as_array(block_indices, "block_indices")
    if block_indices.ndim != 4:
        raise ValueError(f"block_indices must have rank 4 ([B, T, Hkv, K]), got shape {tuple(block_indices.shape)}")
    B, T, Hkv, K = block_indices.shape
    validation.check_block_indices_shape(block_indices, B=B, T=T, Hkv=Hkv)
    value = validation.concrete(block_indices)
    if value is None:
        raise TypeError("check_block_indices needs a concrete array; call it outside jax.jit")
    MSAConfig(block_size=block_size)  # validates block_size
    if isinstance(num_keys, bool) or not isinstance(num_keys, (int, np.integer)) or num_keys < 1:
        raise ValueError(f"num_keys must be a positive int (S), got {num_keys!r}")
    num_keys = int(num_keys)
    q_offset, kv_length, segment_ids = validation.check_positions(
        q_offset, kv_length, segment_ids, B=B, T=T, S=num_keys
    )
    pos = pos_lib.canonicalize(q_offset, kv_length, segment_ids, batch=B, q_len=T, kv_len=num_keys)
    qpos, doc, valid = (np.asarray(x) for x in pos_lib.query_coords(pos, T))
    local = np.maximum(qpos - doc, 0) // block_size
    num_blocks = -(-num_keys // block_size)

    def fail(mask, why):
        b, i, g = (int(x) for x in np.argwhere(mask)[0][:3])
        raise ValueError(f"block_indices[{b}, {i}, {g}] = {value[b, i, g].tolist()}: {why}")

    out_of_range = (value < -1) | (value >= num_blocks)
    if out_of_range.any():
        fail(out_of_range.any(-1), f"ids must lie in [-1, {num_blocks})")
    pad_rows = ~valid[:, :, None] & (value != -1).any(-1)
    if pad_rows.any():
        fail(pad_rows, "padding query rows must be all -1")
    future = valid[:, :, None, None] & (value > local[:, :, None, None])
    if future.any():
        fail(future.any(-1), "block after the query's local block (no visible key)")
    ordered = np.sort(value, axis=-1)
    dup = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)
    if dup.any():
        fail(dup, "duplicate block id in one row")
    return block_indices


# ---- paged caches: decode and chunked prefill (spec, "Inference") ------------------------
#
# Page size = block size, so block ids are logical page ids. The queries are the last T
# tokens of each row (q_offset = kv_length - T unless given): append the new tokens'
# k / v / index_k first (`msa_jax.paged_append`), then call these ops. Inference only: no
# gradient flows through them (their inputs are wrapped in stop_gradient).

_PAGES, _PSCALE, _IPAGES, _ISCALE, _TABLE = "PSHD", "PSH", "PSD", "PS", "BM"


class PagedMSAOutput(NamedTuple):
    """Result of `paged_sparse_attention`.

    out: [B, T, Hq, D] in q's dtype.
    block_indices: int32 [B, T, Hkv, top_k], the selection (logical page ids).
    lse: float32 [B, T, Hq], natural-log normaliser of each row (-inf for padding rows).
    """

    out: jax.Array
    block_indices: jax.Array
    lse: jax.Array


def _paged_positions(B, T, page_table, kv_length, q_offset, num_pages, page_size):
    page_table, q_offset, kv_length = validation.check_page_table(
        page_table, kv_length, q_offset, B=B, T=T, num_pages=num_pages, page_size=page_size
    )
    S = page_table.shape[1] * page_size
    return page_table, pos_lib.canonicalize(q_offset, kv_length, None, batch=B, q_len=T, kv_len=S), S


def _kv_pages_checked(q, k_pages, v_pages, k_scale, v_scale):
    q, k_pages, v_pages = (validation.as_array(x, n) for x, n in ((q, "q"), (k_pages, "k_pages"), (v_pages, "v_pages")))
    k_scale, v_scale = validation.check_kv_pages(q, k_pages, v_pages, k_scale, v_scale)
    return q, k_pages, v_pages, k_scale, v_scale


def paged_select_blocks(
    index_q,
    index_k_pages,
    *,
    page_table,
    kv_length,
    top_k: int = 16,
    q_offset=None,
    index_k_scale=None,
    index_softmax_scale: float | None = None,
    implementation=None,
):
    """The index branch over a paged index-key cache: int32 [B, T, Hkv, top_k].

    Rows as `select_blocks` gives them for the contiguous keys the pages hold (chosen
    non-local pages by descending max-pooled score, ties: smaller id; then the local page;
    then -1; all -1 for padding rows), with logical page ids as block ids.

    Args:
      index_q: [B, T, Hkv, Di], one index query head per GQA group (the last T tokens).
      index_k_pages: [P, page, Di] in index_q's dtype, or float8_e4m3fn with index_k_scale.
      page_table: int32 [B, max_pages]; logical page j of row b is physical page
        page_table[b, j]. Entries past a row's used pages are never read.
      kv_length: int or int32 [B] in [0, max_pages * page]: tokens cached, the new ones included.
      top_k: blocks (pages) kept per (query, group), the local one included.
      q_offset: None (= kv_length - T), int or int32 [B]: position of query 0.
      index_k_scale: float32 [P, page] for FP8 pages (`msa_jax.quantize_fp8`), else None.
        Selection from FP8 keys is approximate: near-tied blocks may swap.
      index_softmax_scale: None for 1/sqrt(Di).
      implementation: as in `sparse_attention`.

    Raises:
      TypeError, ValueError: malformed arguments. NotImplementedError: no implementation serves.
    """
    index_q = validation.as_array(index_q, "index_q")
    index_k_pages = validation.as_array(index_k_pages, "index_k_pages")
    validation.check_rank(index_q, "index_q", 4, "[B, T, Hkv, Di]")
    B, T, Hkv, Di = index_q.shape
    scale = validation.check_index_pages(index_q, index_k_pages, index_k_scale, B=B, T=T, Hkv=None,
                                         num_pages=None, page_size=None)
    P, page = index_k_pages.shape[:2]
    page_table, pos, S = _paged_positions(B, T, page_table, kv_length, q_offset, P, page)
    validation.check_implementation(implementation)
    cfg = MSAConfig(top_k=top_k, block_size=page, index_softmax_scale=index_softmax_scale)
    platform = jax.default_backend()
    call = CallInfo("paged_select_blocks", B, T, S, Hkv, Hkv, 1, Di, str(index_q.dtype), str(index_q.dtype), False,
                    cfg, platform, None, str(index_k_pages.dtype))

    def serve(impl):
        def body(index_q, keys, scale, page_table, q_offset, kv_length):
            pages = IndexPages(_sg(keys), None if scale is None else _sg(scale), page_table)
            return (impl.paged_select_blocks(_sg(index_q), pages, Positions(q_offset, kv_length, None), cfg),)

        args = (index_q, index_k_pages, scale, page_table, pos.q_offset, pos.kv_length)
        return dispatch.shard_local(body, args, (_IQ, _IPAGES, _ISCALE, _TABLE, "B", "B"), (_BI,))[0]

    return dispatch.run("paged_select_blocks", call, dispatch.resolve(implementation, platform), serve)


def paged_block_sparse_attention(
    q,
    k_pages,
    v_pages,
    block_indices,
    *,
    page_table,
    kv_length,
    q_offset=None,
    k_scale=None,
    v_scale=None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    implementation=None,
):
    """The main branch over a paged K/V cache: exact softmax attention over the selected pages.

    Args:
      q: [B, T, Hq, D] float, the last T tokens of each row (their k / v already appended).
      k_pages, v_pages: [P, page, Hkv, D] in q's dtype, or float8_e4m3fn with k_scale /
        v_scale float32 [P, page, Hkv] (one scale per token and head).
      block_indices: int32 [B, T, Hkv, K], logical page ids; each row is a set, as in
        `block_sparse_attention` (order free, -1 and ids outside [0, max_pages) ignored,
        causality per key; duplicates violate the contract).
      page_table, kv_length, q_offset: as in `paged_select_blocks`.
      return_lse: also return lse float32 [B, T, Hq].

    Returns:
      out [B, T, Hq, D] in q's dtype, or (out, lse) if return_lse. No gradient.
    """
    q, k_pages, v_pages, k_scale, v_scale = _kv_pages_checked(q, k_pages, v_pages, k_scale, v_scale)
    B, T, Hq, D = q.shape
    P, page, Hkv, _ = k_pages.shape
    block_indices = validation.check_block_indices_shape(block_indices, B=B, T=T, Hkv=Hkv)
    page_table, pos, S = _paged_positions(B, T, page_table, kv_length, q_offset, P, page)
    validation.check_implementation(implementation)
    cfg = MSAConfig(block_size=page, softmax_scale=softmax_scale)
    platform = jax.default_backend()
    call = CallInfo("paged_block_sparse_attention", B, T, S, Hq, Hkv, D, None, str(q.dtype), None, False, cfg,
                    platform, str(k_pages.dtype), None)

    def serve(impl):
        def body(q, k, v, ks, vs, page_table, bi, q_offset, kv_length):
            pages = KVPages(_sg(k), _sg(v), *(None if s is None else _sg(s) for s in (ks, vs)), page_table)
            return impl.paged_attention_fwd(_sg(q), pages, bi, Positions(q_offset, kv_length, None), cfg)

        args = (q, k_pages, v_pages, k_scale, v_scale, page_table, block_indices, pos.q_offset, pos.kv_length)
        layouts = (_Q, _PAGES, _PAGES, _PSCALE, _PSCALE, _TABLE, _BI, "B", "B")
        return dispatch.shard_local(body, args, layouts, (_Q, "BTH"))

    out, lse = dispatch.run("paged_block_sparse_attention", call, dispatch.resolve(implementation, platform), serve)
    return (out, lse) if return_lse else out


def paged_sparse_attention(
    q,
    k_pages,
    v_pages,
    index_q,
    index_k_pages,
    *,
    page_table,
    kv_length,
    top_k: int = 16,
    q_offset=None,
    k_scale=None,
    v_scale=None,
    index_k_scale=None,
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    implementation=None,
) -> PagedMSAOutput:
    """One decode / chunked-prefill step of MSA over paged caches: selection, then attention.

    The function is `sparse_attention`'s forward (no KL: inference) for the keys the caches
    hold, with q_offset = kv_length - T by default: T = 1..16 new tokens per row for decode and
    multi-token prediction, larger T for chunked prefill. Static shapes, no host
    synchronisation: a decode loop of `paged_append` + this op runs inside one `jax.jit`
    (`lax.fori_loop` / `while_loop`).

    Args:
      q: [B, T, Hq, D]; index_q: [B, T, Hkv, Di] (the new tokens' queries).
      k_pages, v_pages, k_scale, v_scale: as in `paged_block_sparse_attention`.
      index_k_pages, index_k_scale: as in `paged_select_blocks` (FP8 independently of K/V).
      page_table, kv_length, q_offset, top_k, softmax_scale, index_softmax_scale,
        implementation: as in `paged_select_blocks` / `sparse_attention`.

    Returns:
      PagedMSAOutput(out [B,T,Hq,D] in q's dtype, block_indices int32 [B,T,Hkv,top_k],
      lse float32 [B,T,Hq]). Padding queries (position < 0 or >= kv_length): out 0, lse -inf,
      rows of -1.

    Raises:
      TypeError, ValueError: malformed arguments. NotImplementedError: no implementation serves.
    """
    q, k_pages, v_pages, k_scale, v_scale = _kv_pages_checked(q, k_pages, v_pages, k_scale, v_scale)
    index_q, index_k_pages = validation.as_array(index_q, "index_q"), validation.as_array(index_k_pages, "index_k_pages")
    B, T, Hq, D = q.shape
    P, page, Hkv, _ = k_pages.shape
    index_k_scale = validation.check_index_pages(index_q, index_k_pages, index_k_scale, B=B, T=T, Hkv=Hkv,
                                                 num_pages=P, page_size=page)
    Di = index_q.shape[3]
    page_table, pos, S = _paged_positions(B, T, page_table, kv_length, q_offset, P, page)
    validation.check_implementation(implementation)
    cfg = MSAConfig(top_k=top_k, block_size=page, softmax_scale=softmax_scale,
                    index_softmax_scale=index_softmax_scale)
    platform = jax.default_backend()
    call = CallInfo("paged_sparse_attention", B, T, S, Hq, Hkv, D, Di, str(q.dtype), str(index_q.dtype), False, cfg,
                    platform, str(k_pages.dtype), str(index_k_pages.dtype))

    def serve(impl):
        def body(q, k, v, ks, vs, index_q, ik, iks, page_table, q_offset, kv_length):
            p = Positions(q_offset, kv_length, None)
            sg = lambda x: None if x is None else _sg(x)  # noqa: E731
            bi = impl.paged_select_blocks(_sg(index_q), IndexPages(_sg(ik), sg(iks), page_table), p, cfg)
            out, lse = impl.paged_attention_fwd(_sg(q), KVPages(_sg(k), _sg(v), sg(ks), sg(vs), page_table), bi, p, cfg)
            return out, lse, bi

        args = (q, k_pages, v_pages, k_scale, v_scale, index_q, index_k_pages, index_k_scale, page_table,
                pos.q_offset, pos.kv_length)
        layouts = (_Q, _PAGES, _PAGES, _PSCALE, _PSCALE, _IQ, _IPAGES, _ISCALE, _TABLE, "B", "B")
        return dispatch.shard_local(body, args, layouts, (_Q, "BTH", _BI))

    out, lse, bi = dispatch.run("paged_sparse_attention", call, dispatch.resolve(implementation, platform), serve)
    return PagedMSAOutput(out, bi, lse)
