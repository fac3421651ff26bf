"""Context parallelism: one sequence split over the devices of a mesh axis.

Built from MSA's structure (README, "Several devices"):
  * the index keys are one head of Di per token, so every device gathers all of them and
    selects blocks for its own queries exactly as one device would;
  * the main branch reads only the top_k selected blocks per (query, group), but which
    blocks is data dependent and differs from query to query; this first version gathers
    the whole K and V per layer (the same bytes as one ring-attention pass) and the kernels
    read only the selected blocks of it. Queries, outputs and lse never move;
  * causal work is balanced by zig-zag order: the sequence is cut into 2n chunks and device
    d holds chunks d and 2n-1-d, so every device has one early and one late chunk (the
    indexer scores each query against all keys before it: its cost grows with position).

Autodiff does the backward: the transpose of each all-gather is a reduce-scatter of the
gradient (dK, dV, d index_k); the KL sum is all-reduced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import autodiff, dispatch, validation
from .api import MSAOutput, _normalise_kl, _prepare
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

    packed = pos.segment_ids is not None

    def serve(impl):
        def local(q, k, v, index_q, index_k, kv_length, *segments):
            def gather(x):  # the whole sequence in natural order, on every device
                return unzigzag(jax.lax.all_gather(x, axis, axis=1, tiled=True), n)

            k_all, v_all, ik_all = gather(k), gather(v), gather(index_k)
            seg_all = gather(segments[0]) if packed else None
            d = jax.lax.axis_index(axis)
            b = q.shape[0]  # this device's rows
            outs = []
            for j, chunk in enumerate((d, 2 * n - 1 - d)):
                sl = slice(j * c, (j + 1) * c)
                p = Positions(jnp.full((b,), chunk * c, jnp.int32), kv_length, seg_all)
                iq = index_q[:, sl]
                bi = impl.select_blocks(_sg(iq), _sg(ik_all), p, cfg)
                out, lse = autodiff.attention(impl, cfg, q[:, sl], k_all, v_all, bi, *p)
                kl = autodiff.kl_sum(impl, cfg, _sg(q[:, sl]), _sg(k_all), iq, ik_all, bi, _sg(lse), *p)
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
