"""The `cuda` implementation: CUTLASS/CuTe kernels for Hopper (SM90) behind the XLA FFI.

CUDA kernels: `select_blocks` (the fused indexer, cuda/kernels/indexer_sm90.cuh), the
block-sparse attention forward (KV-outer slot partials, cuda/kernels/attention_fwd_sm90.cuh),
its backward (cuda/kernels/attention_bwd_sm90.cuh) and the KL loss's value, student and
gradient passes (cuda/kernels/kl_sm90.cuh), all KV-outer over the work lists of
msa_jax/kv_outer, whose jnp code (shared with pallas) also merges their slot partials. Dense
mode with plain causal positions runs its attention through cuDNN (msa_jax/dense_cudnn.py)
and its KL on a kernel that walks the causal triangle without work lists
(cuda/kernels/dense_kl_sm90.cuh, `dense_kl_fwd`). Paged caches: `paged_select_blocks` scans
the paged index keys with the top-k fused, split over the sequence
(cuda/kernels/paged_indexer_sm90.cuh); msa_jax/paged_scan.py, shared with pallas, plans the
split and merges the lists. The paged attention has no CUDA kernel yet: `paged_sparse_attention`
(the decode step) runs that scan, then Pallas's paged attention kernel; the attention alone
(`paged_block_sparse_attention`) is not served.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import dense_cudnn, ffi, paged_scan
from . import positions as pos_lib
from . import dispatch
from .config import CallInfo
from .dispatch import Implementation
from .ffi import ops
from .kv_outer import partials as kv_partials, worklist
from .kv_outer.worklist import dense_indices

# Ops with a CUDA kernel in them; cuda/include/msa/launch.h and the handlers say the same.
SERVED_OPS = ("select_blocks", "block_sparse_attention", "sparse_attention", "index_kl_loss", "paged_select_blocks",
              "paged_sparse_attention")
# Ops whose main branch is Pallas's kernel (no CUDA one yet): the decode step's paged attention.
_PALLAS_MAIN_OPS = ("paged_sparse_attention",)
# Ops that run one of the indexers (top_k <= _MAX_TOP_K).
_SELECTING_OPS = ("select_blocks", "sparse_attention", "paged_select_blocks", "paged_sparse_attention")
# Ops that read only the index branch: q's head dim, dtype and G do not apply to them.
_INDEX_ONLY_OPS = ("select_blocks", "paged_select_blocks")
_INDEX_HEAD_DIMS = (64, 128)
_HEAD_DIMS = (64, 128)
_DTYPES = ("bfloat16", "float16")
_BLOCK_SIZE = 128
_MAX_TOP_K = 32  # the indexers' running top-k (cuda/kernels/indexer_sm90.cu, paged_indexer_sm90.cu)
_PAGED_ROW_TILE = 64  # query rows (T x Hkv) per CTA of the paged scan (kMaxRows, paged_indexer_sm90.cuh)
_STEP_ROWS = 64  # matrix rows per step of the attention kernel (query tokens x G heads)
# Steps per work item: one K/V tile load serves up to 64 x 64 rows. 64 ran the kernel 4% faster
# than 32 at 32K and 128K (config A, H200; benchmarks/results/logs/h200-20261202-breakdown.log).
_ITEM_STEPS = 64
# The KL kernel reduces a token's G rows within one warp (cuda/kernels/kl_sm90_common.cuh, kMaxGroup)
# and reads the index heads in q's dtype; for larger G, or index heads in another dtype, the KL
# passes are Pallas's (the rest of the op stays CUDA).
_KL_MAX_GROUP = 16


@functools.cache
def _device_reason() -> str | None:
    """None on a Hopper GPU; the kernels are built for sm_90a, which runs on CC 9.0 only."""
    kinds = {getattr(d, "compute_capability", None) for d in jax.devices("cuda")}
    if kinds != {"9.0"}:
        return f"the kernels are built for sm_90a (Hopper, compute capability 9.0); devices have {sorted(map(str, kinds))}"
    return None


class CudaImplementation(Implementation):
    name = "cuda"

    def kl_saved_layouts(self, q, k, index_q):
        if _kl_needs_pallas(q, k, index_q):
            return dispatch.implementation("pallas").kl_saved_layouts(q, k, index_q)
        return ("BTHD", "BSHD")  # kl_fwd saves the gradients for dkl = 1, as Pallas's

    def supports(self, call: CallInfo) -> str | None:
        if call.op not in SERVED_OPS:
            return f"no CUDA kernel for {call.op} yet (served: {', '.join(SERVED_OPS)})"
        if call.platform not in ("gpu", "cuda"):
            return f"needs a CUDA GPU, the platform is {call.platform}"
        reason = ffi.unavailable_reason() or _device_reason()
        if reason is not None:
            return reason
        if call.config.block_size != _BLOCK_SIZE:
            return f"block_size={call.config.block_size} (the kernels are built for {_BLOCK_SIZE})"
        if call.op != "block_sparse_attention":
            if call.index_dtype not in _DTYPES:
                return f"index dtype {call.index_dtype} not in {_DTYPES}"
            if call.index_head_dim not in _INDEX_HEAD_DIMS:
                return f"index head dim Di={call.index_head_dim} not in {_INDEX_HEAD_DIMS}"
        if call.op in _SELECTING_OPS and call.config.top_k > _MAX_TOP_K:
            return f"top_k={call.config.top_k} > {_MAX_TOP_K}"
        if call.op in _PALLAS_MAIN_OPS:
            reason = dispatch.implementation("pallas").supports(call)
            if reason is not None:
                return f"its paged attention is Pallas's kernel, which does not serve this: {reason}"
        elif call.op not in _INDEX_ONLY_OPS:
            if call.dtype not in _DTYPES:
                return f"dtype {call.dtype} not in {_DTYPES}"
            if call.head_dim not in _HEAD_DIMS:
                return f"head_dim D={call.head_dim} not in {_HEAD_DIMS}"
            if call.group_size > _STEP_ROWS:
                return f"G={call.group_size} > {_STEP_ROWS} query heads per kv head"
        return None

    def select_blocks(self, index_q, index_k, positions, cfg):
        ffi.register_targets()
        _, doc, _ = pos_lib.query_coords(positions, index_q.shape[1])
        return ops.select_blocks(
            index_q, index_k, positions.q_offset, positions.kv_length, doc, top_k=cfg.top_k,
            block_size=cfg.block_size, index_softmax_scale=cfg.index_scale(index_q.shape[-1]),
        )

    def paged_select_blocks(self, index_q, pages, positions, cfg):
        """The paged index scan (cuda/kernels/paged_indexer_sm90.cuh): per (batch row, split)
        lists merged by msa_jax/paged_scan.py, as Pallas's. FP8 keys: `pages.scale` set."""
        ffi.register_targets()

        def scan(local, splits: int, pages_per_split: int):
            return ops.paged_index_scan(index_q, pages.keys, pages.scale, pages.page_table, local, top_k=cfg.top_k,
                                        splits=splits, pages_per_split=pages_per_split,
                                        index_softmax_scale=cfg.index_scale(index_q.shape[-1]))

        return paged_scan.select(index_q, positions, top_k=cfg.top_k, page_size=cfg.block_size,
                                 max_pages=pages.page_table.shape[1], row_tile=_PAGED_ROW_TILE, scan=scan)

    def paged_attention_fwd(self, q, pages, block_indices, positions, cfg):
        # No CUDA kernel yet: the decode step's attention is Pallas's (supports() checked it).
        return dispatch.implementation("pallas").paged_attention_fwd(q, pages, block_indices, positions, cfg)

    def attention_fwd(self, q, k, v, block_indices, positions, cfg):
        ffi.register_targets()
        if cfg.dense:
            block_indices = dense_indices(block_indices, k.shape[1], cfg.block_size)
        partials = functools.partial(_partials, scale=cfg.scale(q.shape[-1]), block_size=cfg.block_size,
                                     packed=positions.segment_ids is not None)
        return kv_partials.chunked(q, k, v, block_indices, positions, partials)

    def dense_attention(self, q, k, v, cfg):
        # Dense mode's main branch through cuDNN (msa_jax/dense_cudnn.py), ~3x faster than
        # the block-sparse kernels with every block selected; cuDNN's lse is the KL teacher's
        # normaliser (dense_kl_fwd).
        return dense_cudnn.serve(q, k, v, cfg.scale(q.shape[-1]))

    def attention_lse(self, q, k, block_indices, positions, cfg):
        # No lse-only kernel: the forward with k standing in for v, its output discarded
        # (index_kl_loss alone; sparse_attention's KL takes the forward's own lse).
        return self.attention_fwd(q, k, k, block_indices, positions, cfg)[1]

    def attention_bwd(self, q, k, v, block_indices, positions, cfg, out, lse, dout, dlse):
        ffi.register_targets()
        if cfg.dense:
            block_indices = dense_indices(block_indices, k.shape[1], cfg.block_size)
        return _backward(q, k, v, block_indices, positions, out, lse, dout, dlse, scale=cfg.scale(q.shape[-1]),
                         block_size=cfg.block_size, deterministic=cfg.deterministic)

    def dense_kl_fwd(self, q, k, index_q, index_k, lse, cfg):
        """The KL over the causal triangle without work lists (cuda/kernels/dense_kl_sm90.cuh),
        the student's lse from cuDNN. Not with deterministic=True (d index_q is summed by
        atomics) nor where the KL needs Pallas's kernels: kl_fwd over every block serves those."""
        if cfg.deterministic or _kl_needs_pallas(q, k, index_q):
            return None
        ilse = dense_cudnn.causal_lse(index_q, index_k, cfg.index_scale(index_q.shape[-1]))
        if ilse is None:
            return None
        ffi.register_targets()
        value, d_iq, d_ik = ops.dense_kl(q, k, lse, index_q, index_k, ilse, softmax_scale=cfg.scale(q.shape[-1]),
                                         index_softmax_scale=cfg.index_scale(index_q.shape[-1]))
        return jnp.sum(value), (d_iq, d_ik)

    def kl_value(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        if _kl_needs_pallas(q, k, index_q):
            return dispatch.implementation("pallas").kl_value(q, k, index_q, index_k, block_indices, lse, positions,
                                                              cfg)
        ffi.register_targets()
        if cfg.dense:
            block_indices = dense_indices(block_indices, k.shape[1], cfg.block_size)
        return _kl_partials_pass(q, k, index_q, index_k, block_indices, lse, positions, cfg, student=False)[0]

    def kl_fwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        """Under differentiation the value pass is not run: the student-only pass gives ilse,
        then the gradient pass yields the gradients for dkl = 1 and the value's terms."""
        if _kl_needs_pallas(q, k, index_q):
            return dispatch.implementation("pallas").kl_fwd(q, k, index_q, index_k, block_indices, lse, positions, cfg)
        ffi.register_targets()
        if cfg.dense:
            block_indices = dense_indices(block_indices, k.shape[1], cfg.block_size)
        _, ilse = _kl_partials_pass(q, k, index_q, index_k, block_indices, lse, positions, cfg, student=True)
        value, d_iq, d_ik = _kl_grad(q, k, index_q, index_k, block_indices, lse, ilse, positions, cfg)
        return value, (d_iq, d_ik)

    def kl_bwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl, saved):
        if _kl_needs_pallas(q, k, index_q):
            return dispatch.implementation("pallas").kl_bwd(q, k, index_q, index_k, block_indices, lse, positions, cfg,
                                                            dkl, saved)
        return dispatch.scale_saved_kl_gradients(index_q, index_k, dkl, saved)


def _kl_needs_pallas(q, k, index_q) -> bool:
    """Whether the KL kernel cannot serve a call the other kernels serve: G = Hq / Hkv past its
    limit, or index heads in a dtype other than q's (the kernel has one element type)."""
    return q.shape[2] // k.shape[2] > _KL_MAX_GROUP or index_q.dtype != q.dtype


def item_rows(group: int, item_steps: int = _ITEM_STEPS) -> int:
    """Query tokens per work item of the attention kernel: 64 // G tokens a step."""
    return _STEP_ROWS // group * item_steps


def _partials(q, k, v, hi, c0: int, block_indices, qpos, doc, valid, *, scale: float, block_size: int,
              packed: bool, item_steps: int = _ITEM_STEPS):
    """One query chunk's slot partials from the CUDA kernel, shaped as kv_partials.combine takes
    them: o [B, Tc, K, Hq, D], lse [B, Tc, K, Hq], ok [B, Tc, Hkv, K]. item_steps: the most
    64-row steps one CTA walks over its key tile (benchmarks/breakdown_fwd.py sweeps it);
    packed: whether documents lay their own block grids (tiles then start at any key)."""
    B, Tc, Hkv, K = block_indices.shape
    Hq, D = q.shape[2], q.shape[3]
    work = worklist.build(block_indices, qpos, doc, valid, kv_len=k.shape[1], block_size=block_size,
                          rows=item_rows(Hq // Hkv, item_steps), packed=packed)
    o, lse = ops.sparse_attention_partials(q, k, v, hi, work, q_base=c0, top_k=K, block_size=block_size,
                                           softmax_scale=scale)
    return o.reshape(B, Tc, K, Hq, D), lse.reshape(B, Tc, K, Hq), work.entry_ok


def _backward(q, k, v, block_indices, positions, out, lse, dout, dlse, *, scale: float, block_size: int,
              deterministic: bool):
    """(dq, dk, dv) in the dtypes of q, k, v from the CUDA KV-outer backward.

    Default: one call over all queries with the forward's work items (hot tiles split over
    several CTAs); dq, dk, dv are float32 sums built by atomic adds, so their last bits
    depend on the order the adds land in. deterministic=True: per query chunk, one work item
    per key tile and dq as slot partials summed here over slots, so every sum has a fixed
    order and repeated calls give identical bits (slower where many queries share a tile).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, K = Hq // Hkv, block_indices.shape[3]
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    packed = positions.segment_ids is not None
    # d lse(row) = sum_t ds_t with ds = p * (dp - delta): dlse enters as -dlse in delta.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    call = functools.partial(ops.sparse_attention_bwd, q, k, v, dout, lse, delta, hi, top_k=K,
                             block_size=block_size, softmax_scale=scale, deterministic=deterministic)
    if not deterministic:
        work = worklist.build(block_indices, qpos, doc, valid, kv_len=S, block_size=block_size,
                              rows=item_rows(G), packed=packed)
        dq, dk, dv = call(work, q_base=0)
        return dq.reshape(B, T, Hq, D).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    chunk = kv_partials.query_chunk(T, K * Hq * D * 4)
    dqs, dk, dv = [], 0.0, 0.0
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        Tc = sl.stop - sl.start
        work = worklist.build(block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl], kv_len=S,
                              block_size=block_size, rows=Tc * K, packed=packed)
        dq_part, dk_c, dv_c = call(work, q_base=c0)
        # Rows of entries that took no part were zeroed by the handler: a plain sum over slots.
        dqs.append(jnp.sum(dq_part.reshape(B, Tc, K, Hq, D), axis=2))
        dk, dv = dk + dk_c, dv + dv_c
    dq = jnp.concatenate(dqs, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _kl_partials_pass(q, k, index_q, index_k, block_indices, lse, positions, cfg, *, student: bool):
    """(sum over valid (query, group) rows of KL(P || R), the student's ilse [B, T, Hkv]
    (-inf where the support is empty)) from the CUDA value pass, chunk by chunk; with
    student=True (None, ilse) from the student-only pass (64 tokens a step, no q, no S = Q Kᵀ).

    The pass writes per (entry, key half) the partials of u's log-sum-exp and of
    sum P log P - P u and sum P; merged here: ilse by log-sum-exp over the row's slots and
    halves, KL(row) = sum(P log P - P u) + ilse * sum P (as msa_jax/pallas/kl.py).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, K = Hq // Hkv, block_indices.shape[3]
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    packed = positions.segment_ids is not None
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    chunk = kv_partials.query_chunk(T, K * Hkv * 2 * 4 * 4)
    total, ilses = jnp.zeros((), jnp.float32), []
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        Tc = sl.stop - sl.start
        work = worklist.build(block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl], kv_len=S,
                              block_size=cfg.block_size, rows=item_rows(1 if student else G), packed=packed)
        part = ops.kl_partials(q, k, lse, index_q, index_k, hi, work, q_base=c0, top_k=K,
                               block_size=cfg.block_size, softmax_scale=cfg.scale(D),
                               index_softmax_scale=cfg.index_scale(index_q.shape[-1]), student=student)
        part = jnp.moveaxis(part.reshape(B, Tc, K, Hkv, 2, 4), 3, 2).reshape(B, Tc, Hkv, 2 * K, 4)
        ok = jnp.repeat(work.entry_ok, 2, axis=-1)  # [B, Tc, Hkv, 2K]: both halves of a slot
        ilse = kv_partials.merge_lse(part[..., 0], part[..., 1], ok)
        ilses.append(ilse)
        if student:
            continue
        row_ok = jnp.isfinite(ilse)
        kl_rows = (jnp.sum(jnp.where(ok, part[..., 2], 0.0), -1)
                   + jnp.where(row_ok, ilse, 0.0) * jnp.sum(jnp.where(ok, part[..., 3], 0.0), -1))
        total = total + jnp.sum(jnp.where(row_ok, kl_rows, 0.0))
    return (None if student else total), jnp.concatenate(ilses, axis=1)


def _kl_grad(q, k, index_q, index_k, block_indices, lse, ilse, positions, cfg):
    """(KL value, d index_q [B, T, Hkv, Di], d index_k per kv head [B, S, Hkv, Di]) float32 for
    dkl = 1 from the CUDA gradient pass, given the student's ilse.

    Default: one call over all queries with atomic sums. cfg.deterministic: per query chunk,
    one work item per key tile and d index_q and the value's terms as slot partials summed here,
    so every sum has a fixed order (as `_backward`).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Di = index_q.shape[-1]
    G, K = Hq // Hkv, block_indices.shape[3]
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    packed = positions.segment_ids is not None
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    ilse = jnp.where(jnp.isfinite(ilse), ilse, 0.0)  # rows without support have no entries
    call = functools.partial(ops.kl_bwd, q, k, lse, index_q, index_k, ilse, hi, top_k=K, block_size=cfg.block_size,
                             softmax_scale=cfg.scale(D), index_softmax_scale=cfg.index_scale(Di),
                             deterministic=cfg.deterministic)
    if not cfg.deterministic:
        work = worklist.build(block_indices, qpos, doc, valid, kv_len=S, block_size=cfg.block_size,
                              rows=item_rows(G), packed=packed)
        d_iq, d_ik, terms = call(work, q_base=0)
    else:
        chunk = kv_partials.query_chunk(T, K * Hkv * (Di + 2) * 4)
        d_iqs, termss, d_ik = [], [], 0.0
        for c0 in range(0, T, chunk):
            sl = slice(c0, min(T, c0 + chunk))
            Tc = sl.stop - sl.start
            work = worklist.build(block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl], kv_len=S,
                                  block_size=cfg.block_size, rows=Tc * K, packed=packed)
            d_iq_part, d_ik_c, terms_part = call(work, q_base=c0)
            d_iqs.append(jnp.sum(d_iq_part.reshape(B, Tc, K, Hkv, Di), axis=2))
            termss.append(jnp.sum(terms_part.reshape(B, Tc, K, Hkv, 2), axis=2))
            d_ik = d_ik + d_ik_c
        d_iq, terms = jnp.concatenate(d_iqs, axis=1), jnp.concatenate(termss, axis=1)
    value = jnp.sum(terms[..., 0] + ilse * terms[..., 1])  # KL(row) = sum(P log P - P u) + ilse sum P
    return value, d_iq, d_ik
