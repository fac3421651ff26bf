"""Independent float64 NumPy loop oracle of MiniMax Sparse Attention (shared/spec/msa.md).

This is the ground truth the library's JAX reference is tested against, so it is written
from the spec alone, shares no code with msa_jax, and loops explicitly over batch, query
and head/group: every rule of the spec should be readable off one line here. It is slow
by design; use small shapes.
"""

import math

import numpy as np


def _per_batch(x, B, name, default):
    # None / Python int / [B] int array are all accepted by the spec.
    if x is None:
        return np.asarray(default, np.int64).copy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an int or an int array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        return np.full((B,), int(arr), np.int64)
    if arr.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},), got {arr.shape}")
    return arr.astype(np.int64)


def _positive_int(x, name):
    if isinstance(x, bool) or int(x) != x or int(x) < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def positions(B, T, S, *, q_offset=None, kv_length=None, segment_ids=None):
    """Resolve the spec's position rules once, so selection, attention and KL agree.

    Returns (qpos [B,T], kv_len [B], doc_start_q [B,T], doc_start_k [B,S], seg_q [B,T],
    seg_k [B,S]), all int64. qpos is the key coordinate of each query. seg_* is the index
    of the document (maximal contiguous run of equal segment ids) within its row, not the
    raw segment id, so two separate runs with the same id never see each other. Without
    segment_ids every token is in document 0 starting at key 0.
    """
    kv_len = _per_batch(kv_length, B, "kv_length", np.full((B,), S))
    if np.any(kv_len < 0) or np.any(kv_len > S):
        raise ValueError(f"kv_length must lie in [0, S={S}], got {kv_len.tolist()}")

    if segment_ids is None:
        q_off = _per_batch(q_offset, B, "q_offset", kv_len - T)
        qpos = q_off[:, None] + np.arange(T, dtype=np.int64)[None, :]
        doc_start_q = np.zeros((B, T), np.int64)
        doc_start_k = np.zeros((B, S), np.int64)
        seg_q = np.zeros((B, T), np.int64)
        seg_k = np.zeros((B, S), np.int64)
        return qpos, kv_len, doc_start_q, doc_start_k, seg_q, seg_k

    if q_offset is not None:
        raise ValueError("q_offset must be None with segment_ids (packed self-attention)")
    if T != S:
        raise ValueError(f"segment_ids require T == S, got T={T}, S={S}")
    seg = np.asarray(segment_ids)
    if seg.shape != (B, T) or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segment_ids must be an int array of shape ({B}, {T})")

    doc_id = np.zeros((B, T), np.int64)
    doc_start = np.zeros((B, T), np.int64)
    for b in range(B):
        run, start = -1, 0
        for t in range(T):
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                run, start = run + 1, t
            doc_id[b, t] = run
            doc_start[b, t] = start
    qpos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    return qpos, kv_len, doc_start, doc_start.copy(), doc_id, doc_id.copy()


def _query_view(pos, b, i, S, block_size):
    """Visible keys of query (b, i), their document-relative block ids, and the local block.

    None for a padding query, which the spec excludes from everything.
    """
    qpos, kv_len, doc_start_q, doc_start_k, seg_q, seg_k = pos
    p = int(qpos[b, i])
    if p < 0 or p >= kv_len[b]:
        return None
    visible = [t for t in range(S)
               if t <= p and t < kv_len[b] and seg_k[b, t] == seg_q[b, i]]
    visible = np.asarray(visible, np.int64)
    key_block = (visible - doc_start_k[b, visible]) // block_size
    local = (p - int(doc_start_q[b, i])) // block_size
    return visible, key_block, local


def _support(visible, key_block, row, n_blocks, dense):
    # Rows are sets: order, -1, out-of-range ids and duplicates carry no meaning.
    if dense:
        return visible
    chosen = {int(x) for x in row if 0 <= int(x) < n_blocks}
    keep = np.asarray([int(j) in chosen for j in key_block], bool)
    return visible[keep]


def _logsumexp(x):
    m = np.max(x)
    if m == -np.inf:
        return -np.inf
    return float(m + np.log(np.sum(np.exp(x - m))))


def _check_index(index_q, index_k):
    iq = np.asarray(index_q, np.float64)
    ik = np.asarray(index_k, np.float64)
    if iq.ndim != 4 or ik.ndim != 3:
        raise ValueError("index_q must be [B,T,Hkv,Di] and index_k [B,S,Di]")
    if ik.shape[0] != iq.shape[0] or ik.shape[2] != iq.shape[3]:
        raise ValueError(f"index_q {iq.shape} and index_k {ik.shape} disagree on B or Di")
    return iq, ik


def _check_qk(q, k):
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError("q must be [B,T,Hq,D] and k, v [B,S,Hkv,D]")
    B, _, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on B or D")
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a positive multiple of Hkv={Hkv}")
    return q, k


def _check_block_indices(block_indices, B, T, Hkv):
    bi = np.asarray(block_indices)
    if bi.ndim != 4 or bi.shape[:3] != (B, T, Hkv):
        raise ValueError(f"block_indices must be [{B},{T},{Hkv},K], got {bi.shape}")
    if not np.issubdtype(bi.dtype, np.integer):
        raise ValueError(f"block_indices must be integer, got dtype {bi.dtype}")
    return bi.astype(np.int64)


def select_blocks(index_q, index_k, *, top_k, block_size, q_offset=None, kv_length=None,
                  segment_ids=None, index_softmax_scale=None):
    """Spec "Index branch": max-pooled block scores, top (top_k-1) earlier blocks + local.

    Returns int32 [B,T,Hkv,top_k]; padding queries get a row of -1.
    """
    iq, ik = _check_index(index_q, index_k)
    B, T, Hkv, Di = iq.shape
    S = ik.shape[1]
    top_k = _positive_int(top_k, "top_k")
    block_size = _positive_int(block_size, "block_size")
    si = 1.0 / math.sqrt(Di) if index_softmax_scale is None else float(index_softmax_scale)
    pos = positions(B, T, S, q_offset=q_offset, kv_length=kv_length, segment_ids=segment_ids)

    out = np.full((B, T, Hkv, top_k), -1, np.int32)
    for b in range(B):
        for i in range(T):
            view = _query_view(pos, b, i, S, block_size)
            if view is None:
                continue
            visible, key_block, local = view
            for g in range(Hkv):
                u = si * (ik[b, visible] @ iq[b, i, g])
                # Only blocks before the local one compete; they are all fully visible,
                # so the max is over the whole block.
                score = {}
                for j, uj in zip(key_block.tolist(), u.tolist()):
                    if j < local:
                        score[j] = max(score.get(j, -np.inf), uj)
                ranked = sorted(score, key=lambda j: (-score[j], j))
                row = ranked[:min(top_k - 1, local)] + [local]
                out[b, i, g, :len(row)] = row
    return out


def attention(q, k, v, block_indices, *, block_size, q_offset=None, kv_length=None,
              segment_ids=None, softmax_scale=None, dense=False):
    """Spec "Main branch": softmax attention over the selected blocks' visible keys.

    Returns (out float64 [B,T,Hq,D], lse float64 [B,T,Hq]); empty support or a padding
    query gives out 0, lse -inf. dense=True ignores block_indices (may be None).
    """
    q, k = _check_qk(q, k)
    v = np.asarray(v, np.float64)
    if v.shape != k.shape:
        raise ValueError(f"v {v.shape} must match k {k.shape}")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_size = _positive_int(block_size, "block_size")
    s = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    bi = None if dense else _check_block_indices(block_indices, B, T, Hkv)
    n_blocks = -(-S // block_size)
    pos = positions(B, T, S, q_offset=q_offset, kv_length=kv_length, segment_ids=segment_ids)

    out = np.zeros((B, T, Hq, D), np.float64)
    lse = np.full((B, T, Hq), -np.inf, np.float64)
    for b in range(B):
        for i in range(T):
            view = _query_view(pos, b, i, S, block_size)
            if view is None:
                continue
            visible, key_block, _ = view
            for h in range(Hq):
                g = h // G
                row = None if dense else bi[b, i, g]
                sup = _support(visible, key_block, row, n_blocks, dense)
                if sup.size == 0:
                    continue
                scores = s * (k[b, sup, g] @ q[b, i, h])
                lse[b, i, h] = _logsumexp(scores)
                out[b, i, h] = np.exp(scores - lse[b, i, h]) @ v[b, sup, g]
    return out, lse


def kl_loss(q, k, index_q, index_k, block_indices, *, block_size, q_offset=None,
            kv_length=None, segment_ids=None, softmax_scale=None, index_softmax_scale=None,
            kl_coeff=1.0, dense=False):
    """Spec "KL index-alignment loss": KL(teacher P || index student R) on the same support.

    Returns (loss, d loss/d index_q [B,T,Hkv,Di], d loss/d index_k [B,S,Di]). The gradient
    is the spec's closed form d/du = (R - P) * kl_coeff/(Hkv*N) chained through
    u = si * <index_q, index_k>; q and k are treated as constants (detached teacher).
    """
    q, k = _check_qk(q, k)
    iq, ik = _check_index(index_q, index_k)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if iq.shape[:3] != (B, T, Hkv) or ik.shape[1] != S:
        raise ValueError(f"index_q {iq.shape} / index_k {ik.shape} do not match q {q.shape}"
                         f" / k {k.shape}")
    Di = iq.shape[3]
    G = Hq // Hkv
    block_size = _positive_int(block_size, "block_size")
    s = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    si = 1.0 / math.sqrt(Di) if index_softmax_scale is None else float(index_softmax_scale)
    bi = None if dense else _check_block_indices(block_indices, B, T, Hkv)
    n_blocks = -(-S // block_size)
    pos = positions(B, T, S, q_offset=q_offset, kv_length=kv_length, segment_ids=segment_ids)

    d_iq = np.zeros_like(iq)
    d_ik = np.zeros_like(ik)
    views = [[_query_view(pos, b, i, S, block_size) for i in range(T)] for b in range(B)]
    N = sum(view is not None for row in views for view in row)
    if N == 0:
        return 0.0, d_iq, d_ik

    total = 0.0
    for b in range(B):
        for i in range(T):
            view = views[b][i]
            if view is None:
                continue
            visible, key_block, _ = view
            for g in range(Hkv):
                row = None if dense else bi[b, i, g]
                sup = _support(visible, key_block, row, n_blocks, dense)
                if sup.size == 0:
                    continue
                P = np.zeros(sup.size, np.float64)
                for h in range(g * G, (g + 1) * G):
                    scores = s * (k[b, sup, g] @ q[b, i, h])
                    P += np.exp(scores - _logsumexp(scores))
                P /= G
                u = si * (ik[b, sup] @ iq[b, i, g])
                log_r = u - _logsumexp(u)
                # 0 * log 0 = 0: a key the teacher never attends to costs nothing.
                nz = P > 0
                total += float(np.sum(P[nz] * (np.log(P[nz]) - log_r[nz])))
                du = np.exp(log_r) - P
                d_iq[b, i, g] += si * (du @ ik[b, sup])
                d_ik[b, sup] += si * np.outer(du, iq[b, i, g])

    c = float(kl_coeff) / (Hkv * N)
    return c * total, c * d_iq, c * d_ik
