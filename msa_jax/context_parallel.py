"""Context parallelism: one sequence split over the devices of a mesh axis.

Built from MSA's structure (README, "Several devices"):
  * the index keys are one head of Di per token, so every device gathers all of them and
    selects blocks for its own queries exactly as one device would;
  * the main branch reads only the top_k selected blocks per (query, group), but which
    blocks is data dependent and differs from query to query. By default every device
    gathers the whole K and V per layer (the same bytes as one ring-attention pass) and the
    kernels read only the selected blocks of it. With `kv_fetch_blocks=C` a device instead
    asks each device for the blocks of its chunks that its own queries selected (their
    union per row and kv head, at most C per device pair: a fixed-size all-to-all), and the
    whole gather is the fallback in a call where some device needs more. Queries, outputs
    and lse never move;
  * causal work is balanced by zig-zag order: the sequence is cut into 2n chunks and device
    d holds chunks d and 2n-1-d, so every device has one early and one late chunk (the
    indexer scores each query against all keys before it: its cost grows with position).

Autodiff does the backward: the transpose of each all-gather is a reduce-scatter of the
gradient (dK, dV, d index_k), that of the all-to-all an all-to-all of the fetched blocks'
dK, dV back to their owners; the KL sum is all-reduced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import autodiff, dispatch, validation
from .api import MSAOutput, _normalise_kl, _prepare
from . import positions as pos_lib
from .config import Positions

_sg = jax.lax.stop_gradient


def zigzag(x, num_shards: int, axis: int = 1):
    """x with its `axis` (the sequence) in zig-zag order for `num_shards` devices.

    The sequence is cut into 2 * num_shards equal chunks; the result holds chunks
    0, 2n-1, 1, 2n-2, ..., n-1, n, so a contiguous split into n shards gives device d the
    chunks d and 2n-1-d. A model permutes its tokens once (after the embedding) and keeps
    this order through every layer; `unzigzag` restores the natural order.
    """
    n = _check_shards(num_shards, x.shape[axis], "x")
    x = jnp.moveaxis(x, axis, 0)
    chunks = x.reshape(2, n, -1, *x.shape[1:])  # [half, chunk in half, c, ...]
    pairs = jnp.stack([chunks[0], chunks[1][::-1]], axis=1)  # [device, 2, c, ...]
    return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def unzigzag(x, num_shards: int, axis: int = 1):
    """Inverse of `zigzag`: natural sequence order back."""
    n = _check_shards(num_shards, x.shape[axis], "x")
    x = jnp.moveaxis(x, axis, 0)
    pairs = x.reshape(n, 2, -1, *x.shape[1:])
    natural = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]], axis=0)
    return jnp.moveaxis(natural.reshape(x.shape), 0, axis)


def _check_shards(num_shards, length, what):
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if length % (2 * num_shards):
        raise ValueError(
            f"{what}'s sequence length {length} must be a multiple of 2 * num_shards = {2 * num_shards} "
            "(zig-zag order cuts it into 2 chunks per device)")
    return num_shards


def context_parallel_sparse_attention(
    q,
    k,
    v,
    index_q,
    index_k,
    *,
    mesh: Mesh,
    axis: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    kv_length=None,
    segment_ids=None,
    top_k: int = 16,
    block_size: int = 128,
    mode: str = "sparse",
    softmax_scale: float | None = None,
    index_softmax_scale: float | None = None,
    kl_coeff: float = 1.0,
    implementation=None,
    kv_fetch_blocks: int | None = None,
) -> MSAOutput:
    """`sparse_attention` (causal self-attention, T == S) with the sequence split over `axis`.

    Args:
      q, k, v, index_q, index_k: as in `sparse_attention`, with T == S, and the sequence
        axis in zig-zag order for n = mesh.shape[axis] devices (`zigzag(x, n)`). They may be
        sharded over the sequence along `axis` (the layout this op computes in) or not at all.
      mesh: a `jax.sharding.Mesh`; axes other than `axis`, `batch_axis` and `head_axis` hold
        replicas.
      axis: the mesh axis the sequence is split over; S must be a multiple of 2 * n.
      batch_axis: a second mesh axis to split the batch over (data parallelism beside the
        context parallelism), or None; B must be a multiple of its size.
      head_axis: a mesh axis to split the heads over (tensor parallelism beside the context
        parallelism), or None: q's query heads and k's, v's and index_q's kv heads alike, so
        its size must divide Hkv (a device holds whole GQA groups); index_k (one head) is
        replicated over it and its gradient summed over it.
      kv_length: None (every token real), or an int or int32 [B]: the real tokens of each
        row, counted in natural order; tokens at natural positions >= kv_length[b] are right
        padding. The same as `sparse_attention(..., q_offset=0, kv_length=kv_length)`:
        padding queries give out 0, lse -inf, block ids -1 and nothing to the KL loss.
      segment_ids: None, or int [B, S] in zig-zag order like the other inputs: packed
        documents, as `sparse_attention(..., segment_ids=...)` on the natural order (a query
        sees only its own document; block ids are document-relative). Each device gathers
        the whole row's ids (one int per token) to find where its queries' documents start.
      top_k, block_size, mode, softmax_scale, index_softmax_scale, kl_coeff,
        implementation: as in `sparse_attention`.
      kv_fetch_blocks: None (every device gathers the whole K and V), or C >= 1: each device
        fetches from every device only the K/V blocks of that device's chunks that its own
        queries selected, at most C per (device pair, row, kv head), through one fixed-size
        all-to-all (C blocks of K and V each per pair: pick C below 2 * S / (2n) / block_size,
        the blocks a device holds, to move less than the gather). A call in which some device
        needs more than C blocks from one device gathers the whole K and V instead (same
        results either way), and so does mode="dense" (it reads every earlier block). Needs
        chunks of whole blocks: S / (2n) a multiple of block_size.

    Returns:
      MSAOutput(out, kl_loss, block_indices, lse) equal to `sparse_attention` on the
      natural-order inputs, with out, block_indices and lse in zig-zag order (sharded over
      the sequence along `axis`); block ids are global. Gradients as in `sparse_attention`.

    Raises:
      TypeError, ValueError: malformed arguments, an axis not in the mesh, S not a multiple
        of 2 * n. NotImplementedError: no requested implementation serves the call.
    """
    v, index_q = validation.as_array(v, "v"), validation.as_array(index_q, "index_q")
    # Self-attention over each row's first kv_length tokens: queries start at key 0.
    q_offset = None if kv_length is None or segment_ids is not None else 0
    q, k, v, index_q, index_k, cfg, pos, call, names = _prepare(
        "sparse_attention", q, k, v, index_q, index_k, q_offset, kv_length, segment_ids, implementation,
        top_k=top_k, block_size=block_size, mode=mode, softmax_scale=softmax_scale,
        index_softmax_scale=index_softmax_scale, kl_coeff=kl_coeff,
    )
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    named = (("axis", axis), ("batch_axis", batch_axis), ("head_axis", head_axis))
    for name, a in named:
        if a is not None and a not in mesh.axis_names:
            raise ValueError(f"{name} {a!r} is not an axis of the mesh {mesh.axis_names}")
    used = [a for _, a in named if a is not None]
    if axis is None or len(set(used)) != len(used):
        raise ValueError("axis must name a mesh axis, and batch_axis / head_axis other ones, got "
                         + ", ".join(f"{name}={a!r}" for name, a in named))
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if batch_axis is not None and B % mesh.shape[batch_axis]:
        raise ValueError(f"the batch B={B} must be a multiple of mesh.shape[{batch_axis!r}] = {mesh.shape[batch_axis]}")
    if head_axis is not None and k.shape[2] % mesh.shape[head_axis]:
        raise ValueError(f"the kv heads Hkv={k.shape[2]} must be a multiple of mesh.shape[{head_axis!r}] = "
                         f"{mesh.shape[head_axis]} (a device holds whole GQA groups)")
    if T != S:
        raise ValueError(f"context parallelism is for self-attention: q has T={T} tokens, k has S={S}")
    n = _check_shards(mesh.shape[axis], S, "q")
    c = S // (2 * n)  # tokens per chunk; each device holds two
    if kv_fetch_blocks is not None:
        if isinstance(kv_fetch_blocks, bool) or not isinstance(kv_fetch_blocks, int) or kv_fetch_blocks < 1:
            raise ValueError(f"kv_fetch_blocks must be None or a positive int, got {kv_fetch_blocks!r}")
        if c % block_size:
            raise ValueError(f"kv_fetch_blocks needs chunks of whole blocks: S / (2 * n) = {c} tokens is not a "
                             f"multiple of block_size={block_size}")

    packed = pos.segment_ids is not None

    def serve(impl):
        def local(q, k, v, index_q, index_k, kv_length, *segments):
            def gather(x):  # the whole sequence in natural order, on every device
                return unzigzag(jax.lax.all_gather(x, axis, axis=1, tiled=True), n)

            ik_all = gather(index_k)
            seg_all = gather(segments[0]) if packed else None
            d = jax.lax.axis_index(axis)
            b = q.shape[0]  # this device's rows
            chunks = []  # (query slice, positions, selection) of the device's two chunks
            for j, chunk in enumerate((d, 2 * n - 1 - d)):
                sl = slice(j * c, (j + 1) * c)
                p = Positions(jnp.full((b,), chunk * c, jnp.int32), kv_length, seg_all)
                chunks.append((sl, p, impl.select_blocks(_sg(index_q[:, sl]), _sg(ik_all), p, cfg)))
            if kv_fetch_blocks is None or cfg.dense:  # dense mode reads every earlier block
                k_all, v_all = gather(k), gather(v)
            else:
                needed = _needed_blocks([(bi, p) for _, p, bi in chunks], c, cfg.block_size, S)
                k_all, v_all = fetch_selected_kv(k, v, needed, axis=axis, num_shards=n, block_size=cfg.block_size,
                                                 capacity=kv_fetch_blocks)
            outs = []
            for sl, p, bi in chunks:
                iq = index_q[:, sl]
                out, lse = autodiff.attention(impl, cfg, q[:, sl], k_all, v_all, bi, *p)
                kl = autodiff.kl_sum(impl, cfg, False, _sg(q[:, sl]), _sg(k_all), iq, ik_all, bi, _sg(lse), *p)
                outs.append((out, lse, bi, kl))
            (o0, l0, b0, k0), (o1, l1, b1, k1) = outs
            cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
            return cat(o0, o1), cat(l0, l1), cat(b0, b1), (k0 + k1)[None]

        seq4, seq3 = P(batch_axis, axis, head_axis, None), P(batch_axis, axis, None)
        in_specs = (seq4, seq4, seq4, seq4, seq3, P(batch_axis)) + ((P(batch_axis, axis),) if packed else ())
        # shard_map wants its inputs laid out as in_specs say; inputs already split over
        # the sequence along `axis` (and the batch along `batch_axis`) do not move.
        explicit = dict(zip(mesh.axis_names, mesh.axis_types))[axis] == AxisType.Explicit
        move = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
        inputs = (q, k, v, index_q, index_k, pos.kv_length) + ((pos.segment_ids,) if packed else ())
        args = [move(x, NamedSharding(mesh, spec)) for x, spec in zip(inputs, in_specs)]
        # check_vma=False: the Pallas kernels' out_shape carries no varying-axes type, which
        # shard_map's check demands. Nothing here needs that check: the all-gathers transpose
        # to reduce-scatters either way, and the KL partial sums leave as one value per
        # device and are added outside, so no psum has to be transposed.
        out, lse, bi, kl_parts = jax.shard_map(
            local, mesh=mesh, in_specs=in_specs, check_vma=False,
            out_specs=(seq4, P(batch_axis, axis, head_axis), seq4, P(tuple(a for a in (batch_axis, head_axis, axis) if a))),
        )(*args)
        return out, lse, bi, jnp.sum(kl_parts)

    out, lse, bi, kl = dispatch.run("sparse_attention", call, names, serve)
    return MSAOutput(out, _normalise_kl(kl, cfg, pos, T, k.shape[2]), bi, lse)


def _needed_blocks(selections, chunk: int, block_size: int, kv_len: int):
    """bool [b, h, S / block_size]: the natural-order K/V blocks some query of this device
    reads, from its chunks' (block_indices [b, chunk, h, K], positions). A selected block
    starts at doc + id * block_size (doc 0 without packed documents), so it covers one or,
    when its document starts inside a block, two natural blocks."""
    num_blocks = kv_len // block_size
    b, _, h, _ = selections[0][0].shape
    rows = jnp.arange(b)[:, None, None, None]
    heads = jnp.arange(h)[None, None, :, None]
    needed = jnp.zeros((b, h, num_blocks), bool)
    for bi, p in selections:
        _, doc, valid = pos_lib.query_coords(p, chunk)
        ok = (bi >= 0) & (bi < num_blocks) & valid[:, :, None, None]
        first = doc[:, :, None, None] + jnp.where(ok, bi, 0) * block_size
        for key in (first, first + block_size - 1):  # the natural blocks of its first and last key
            blk = jnp.where(ok, jnp.minimum(key // block_size, num_blocks - 1), num_blocks)  # num_blocks: dropped
            needed = needed.at[rows, heads, blk].set(True, mode="drop")
    return needed


def _device_blocks(device, num_shards: int, chunk_blocks: int):
    """int32 [2 * chunk_blocks]: the natural block ids device `device` holds, in its local
    (zig-zag) order: those of chunk `device`, then those of chunk 2n-1-device."""
    i = jnp.arange(chunk_blocks, dtype=jnp.int32)
    return jnp.concatenate([device * chunk_blocks + i, (2 * num_shards - 1 - device) * chunk_blocks + i])


def _first_wanted(want, capacity: int):
    """(slots int32 [..., capacity]: the positions of the first `capacity` True entries of
    want [..., m] in order (then False ones), count int32 [...]: how many are True)."""
    order = jnp.argsort(~want, axis=-1, stable=True)[..., :capacity].astype(jnp.int32)
    return order, jnp.sum(want, axis=-1, dtype=jnp.int32)


def fetch_selected_kv(k, v, needed, *, axis: str, num_shards: int, block_size: int, capacity: int):
    """(k_all, v_all) [b, S, h, D] in natural order holding every block `needed` marks (the
    others zero), fetched from their owners inside shard_map over `axis`.

    k, v: this device's zig-zag shard [b, 2c, h, D] (chunks d and 2n-1-d, c a multiple of
    block_size); needed: bool [b, h, S / block_size], this device's wanted natural blocks.
    Every device sends to every device the first `capacity` blocks of its own that the other
    wants (per row and kv head, in block order), all in one all-to-all of fixed size; each
    receiver places them by the same rule. If any device wants more than `capacity` blocks
    from one owner, every device gathers the whole K and V instead (a cond on an all-reduced
    flag, so all devices take the same branch).
    """
    n, bk = num_shards, block_size
    b, local_len, h, dim = k.shape
    m = local_len // bk  # blocks a device holds
    num_blocks = n * m
    capacity = min(capacity, m)
    d = jax.lax.axis_index(axis)
    owners_blocks = jnp.stack([_device_blocks(o, n, m // 2) for o in range(n)])  # [n, m]
    # What I want from each owner, in the order the owner will pick it.
    my_want = jnp.take_along_axis(needed[None], owners_blocks[:, None, None, :], axis=-1)  # [n, b, h, m]
    my_count = jnp.sum(my_want, axis=-1, dtype=jnp.int32)
    overflow = jax.lax.psum(jnp.any(my_count > capacity).astype(jnp.int32), axis)

    def gather_all(k, v):
        whole = lambda x: unzigzag(jax.lax.all_gather(x, axis, axis=1, tiled=True), n)  # noqa: E731
        return whole(k), whole(v)

    def fetch(k, v):
        # Owner side: the requests of every device for my blocks.
        requests = jax.lax.all_gather(needed.astype(jnp.int8), axis) > 0  # [n, b, h, S / bk]
        want = jnp.take(requests, _device_blocks(d, n, m // 2), axis=-1)  # [n, b, h, m]
        slots, _ = _first_wanted(want, capacity)  # [n, b, h, C]
        kv = jnp.stack([k, v], axis=-2).reshape(b, m, bk, h, 2, dim)
        blocks = jnp.transpose(kv, (0, 3, 1, 2, 4, 5))  # [b, h, m, bk, 2, D]
        send = jnp.take_along_axis(blocks[None], slots[..., None, None, None], axis=3)  # [n, b, h, C, bk, 2, D]
        recv = jax.lax.all_to_all(send, axis, 0, 0)  # [owner, b, h, C, bk, 2, D]
        # Receiver side: owner o's slot s holds natural block owners_blocks[o, my_slots[o, ..., s]].
        my_slots, _ = _first_wanted(my_want, capacity)
        ids = jnp.take_along_axis(owners_blocks[:, None, None, :], my_slots, axis=-1)  # [n, b, h, C]
        ids = jnp.where(jnp.arange(capacity) < my_count[..., None], ids, num_blocks)  # unused slots: dropped
        rows = jnp.arange(b)[None, :, None, None]
        heads = jnp.arange(h)[None, None, :, None]
        full = jnp.zeros((b, h, num_blocks, bk, 2, dim), k.dtype).at[rows, heads, ids].set(recv, mode="drop")
        full = jnp.transpose(full, (0, 2, 3, 1, 4, 5)).reshape(b, num_blocks * bk, h, 2, dim)
        return full[..., 0, :], full[..., 1, :]

    return jax.lax.cond(overflow > 0, gather_all, fetch, k, v)
