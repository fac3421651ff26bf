"""Implementation calls that stay shard-local under `jax.jit`'s own sharding.

Under plain `jax.jit` with `NamedSharding` inputs (no explicit mesh), XLA's partitioner
sees each implementation call as an operation it must split. A custom call (the cuda
kernels, Pallas/Triton kernels on a GPU) is opaque to it, so it gathers the operands onto
every device and runs the whole call everywhere. `AutoSharded` wraps every method of an
implementation in `jax.experimental.custom_partitioning`: the partitioner then asks us how
to split the call, and the answer is MSA's structure: batch and heads (query and kv heads
alike, so every shard holds whole GQA groups) are independent, everything else stays whole.
The call runs on the local shard of every operand; scalars summed over rows (the KL sum)
and gradients of tensors shared by all heads (index_k) are added up with one all-reduce.

The wrap sits below the custom_vjp rules (autodiff.py): custom_partitioning functions
are not differentiable, but the forward and backward functions the rules call need not be.
Under an explicit mesh the ops already run in `shard_map` (dispatch.shard_local), where
custom_partitioning lowers to the wrapped function itself. Under `jax.vmap` the call falls
back to the vmapped, unpartitioned function (custom_partitioning has no batching rule).

Layout strings give one letter per dimension, as in dispatch.shard_local: "B" batch, "H"
heads, any other letter a dimension kept whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .config import Positions
from .dispatch import Implementation

# Layouts of the spec's tensors (spec, "Notation").
_Q, _KV, _IQ, _IK, _BI, _LSE = "BTHD", "BSHD", "BTHD", "BSD", "BTHK", "BTH"
_POS = ("B", "B", "BT")


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _size(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _split_axes(mesh, infos, layouts):
    """(batch axes, head axes) to split over: those of the first operand with a "B" (an "H")
    dimension, dropped where some operand's dimension does not divide evenly (that letter
    then stays whole: correct, only not split)."""
    chosen = {}
    for letter in "BH":
        for info, layout in zip(infos, layouts):
            if letter in layout and isinstance(info.sharding, NamedSharding):
                spec = tuple(info.sharding.spec)
                dim = layout.index(letter)
                chosen[letter] = _axes(spec[dim]) if dim < len(spec) else ()
                break
        axes = chosen.get(letter, ())
        n = _size(mesh, axes)
        if any(info.shape[d] % n for info, layout in zip(infos, layouts) for d, l in enumerate(layout) if l == letter):
            chosen[letter] = ()
    batch, heads = chosen.get("B", ()), chosen.get("H", ())
    if set(batch) & set(heads):  # one mesh axis cannot split two dimensions of one tensor
        heads = ()
    return batch, heads


def _spec(layout, batch, heads):
    dims = []
    for letter in layout:
        axes = batch if letter == "B" else heads if letter == "H" else ()
        dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*dims)


def _sharding_rule(in_layouts, in_shapes, out_layouts, out_shapes) -> SdyShardingRule:
    """Shardy's view of the call: batch one factor, heads one factor per head count (Hq and
    Hkv differ in size), every other dimension a factor of its own operand."""

    def mapping(layout, shape, tag):
        names = []
        for d, letter in enumerate(layout):
            if letter == "B":
                names.append("b")
            elif letter == "H":
                names.append(f"h{shape[d]}")
            else:
                names.append(f"{tag}_{d}")
        return ArrayMapping(*names)

    return SdyShardingRule(
        tuple(mapping(l, s, f"i{i}") for i, (l, s) in enumerate(zip(in_layouts, in_shapes))),
        tuple(mapping(l, s, f"o{i}") for i, (l, s) in enumerate(zip(out_layouts, out_shapes))),
    )


def shard_local_call(fn: Callable, args: Sequence, layouts: Sequence, out_layouts: Sequence, *,
                     summed: dict[int, str] | None = None):
    """fn(*args) as one operation that jit's partitioner splits over batch and heads only.

    Args:
      fn: takes the arguments (None where `args` holds None) and returns a tuple of arrays.
      args: arrays or None.
      layouts: one layout string per argument (ignored for None).
      out_layouts: one layout string per output ("" for a scalar).
      summed: output index -> letters ("B", "H" or both) over whose shards that output is a
        partial sum: the local results are all-reduced over those mesh axes.

    Returns:
      fn's outputs (a tuple). Each shard computes fn on its local block; no operand sharded
      over batch/heads is gathered.
    """
    summed = dict(summed or {})
    present = [i for i, a in enumerate(args) if a is not None]
    in_layouts = [layouts[i] for i in present]

    def full(arrays):
        out = [None] * len(args)
        for i, a in zip(present, arrays):
            out[i] = a
        return out

    traced = {}

    def plain(*arrays):
        outs = tuple(fn(*full(arrays)))
        traced["out_shapes"] = [o.shape for o in outs]  # read by the sharding rule at lowering
        return outs

    def partition(mesh, arg_infos, result_infos):
        batch, heads = _split_axes(mesh, arg_infos, in_layouts)
        arg_shardings = tuple(NamedSharding(mesh, _spec(l, batch, heads)) for l in in_layouts)
        out_shardings = tuple(NamedSharding(mesh, _spec(l, batch, heads)) for l in out_layouts)

        def lower(*arrays):
            outs = list(plain(*arrays))
            for i, letters in summed.items():
                axes = (batch if "B" in letters else ()) + (heads if "H" in letters else ())
                if axes:
                    outs[i] = jax.lax.psum(outs[i], axes)
            return tuple(outs)

        return mesh, lower, out_shardings, arg_shardings

    def infer(mesh, arg_infos, result_infos):  # the GSPMD partitioner's question (Shardy off)
        batch, heads = _split_axes(mesh, arg_infos, in_layouts)
        return tuple(NamedSharding(mesh, _spec(l, batch, heads)) for l in out_layouts)

    arrays = [args[i] for i in present]
    in_shapes = [a.shape for a in arrays]

    def rule(mesh, operand_types, result_types):  # Shardy's question; asked after plain was traced
        return _sharding_rule(in_layouts, in_shapes, out_layouts, traced["out_shapes"])

    partitioned = custom_partitioning(plain)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)

    # custom_partitioning has no batching rule: under vmap run the plain function, vmapped.
    batched = custom_vmap(lambda *a: tuple(partitioned(*a)))

    @batched.def_vmap
    def _vmap_rule(axis_size, in_batched, *a):
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(plain, in_axes=axes, axis_size=axis_size)(*a), tuple(True for _ in out_layouts)

    return batched(*arrays)


class AutoSharded(Implementation):
    """`inner` with its contiguous-cache methods each a `shard_local_call` (module docstring).

    kl_fwd's `saved` arrays are split by `inner.kl_saved_layouts(...)`. The paged ops pass through
    unwrapped: their caches are laid out by physical page, not by batch row.
    """

    def __init__(self, inner: Implementation):
        self.inner = inner
        self.name = inner.name

    def supports(self, call):
        return self.inner.supports(call)

    def select_blocks(self, index_q, index_k, positions, cfg):
        def f(iq, ik, *pos):
            return (self.inner.select_blocks(iq, ik, Positions(*pos), cfg),)

        return shard_local_call(f, (index_q, index_k, *positions), (_IQ, _IK, *_POS), (_BI,))[0]

    def attention_fwd(self, q, k, v, block_indices, positions, cfg):
        def f(q, k, v, bi, *pos):
            return self.inner.attention_fwd(q, k, v, bi, Positions(*pos), cfg)

        return shard_local_call(f, (q, k, v, block_indices, *positions), (_Q, _KV, _KV, _BI, *_POS), (_Q, _LSE))

    def attention_lse(self, q, k, block_indices, positions, cfg):
        def f(q, k, bi, *pos):
            return (self.inner.attention_lse(q, k, bi, Positions(*pos), cfg),)

        return shard_local_call(f, (q, k, block_indices, *positions), (_Q, _KV, _BI, *_POS), (_LSE,))[0]

    def attention_bwd(self, q, k, v, block_indices, positions, cfg, out, lse, dout, dlse):
        def f(q, k, v, bi, out, lse, dout, dlse, *pos):
            return self.inner.attention_bwd(q, k, v, bi, Positions(*pos), cfg, out, lse, dout, dlse)

        return shard_local_call(
            f, (q, k, v, block_indices, out, lse, dout, dlse, *positions),
            (_Q, _KV, _KV, _BI, _Q, _LSE, _Q, _LSE, *_POS), (_Q, _KV, _KV),
        )

    def kl_saved_layouts(self, q, k, index_q):
        return self.inner.kl_saved_layouts(q, k, index_q)

    def kl_value(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        def f(q, k, iq, ik, bi, lse, *pos):
            return (self.inner.kl_value(q, k, iq, ik, bi, lse, Positions(*pos), cfg),)

        return shard_local_call(
            f, (q, k, index_q, index_k, block_indices, lse, *positions), (_Q, _KV, _IQ, _IK, _BI, _LSE, *_POS),
            ("",), summed={0: "BH"},
        )[0]

    def kl_fwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        saved_layouts = self.inner.kl_saved_layouts(q, k, index_q)
        holder = {}

        def f(q, k, iq, ik, bi, lse, *pos):
            value, saved = self.inner.kl_fwd(q, k, iq, ik, bi, lse, Positions(*pos), cfg)
            leaves, holder["tree"] = jax.tree.flatten(saved)
            if len(leaves) != len(saved_layouts):
                raise NotImplementedError(
                    f"{self.inner.name}.kl_fwd saves {len(leaves)} arrays but kl_saved_layouts names "
                    f"{len(saved_layouts)}: cannot split them under automatic sharding")
            return (value, *leaves)

        outs = shard_local_call(
            f, (q, k, index_q, index_k, block_indices, lse, *positions), (_Q, _KV, _IQ, _IK, _BI, _LSE, *_POS),
            ("", *saved_layouts), summed={0: "BH"},
        )
        return outs[0], jax.tree.unflatten(holder["tree"], outs[1:])

    def dense_attention(self, q, k, v, cfg):
        # What implementations serve it with, JAX's cuDNN attention, partitions itself and
        # carries its own gradients: no shard_local_call around it (not run on several GPUs).
        return self.inner.dense_attention(q, k, v, cfg)

    def dense_kl_fwd(self, q, k, index_q, index_k, lse, cfg):
        if jax.eval_shape(lambda *a: self.inner.dense_kl_fwd(*a, cfg), q, k, index_q, index_k, lse) is None:
            return None  # the implementation has no such kernels for this call
        saved_layouts = self.inner.kl_saved_layouts(q, k, index_q)
        holder = {}

        def f(q, k, iq, ik, lse):
            value, saved = self.inner.dense_kl_fwd(q, k, iq, ik, lse, cfg)
            leaves, holder["tree"] = jax.tree.flatten(saved)
            return (value, *leaves)

        outs = shard_local_call(f, (q, k, index_q, index_k, lse), (_Q, _KV, _IQ, _IK, _LSE), ("", *saved_layouts),
                                summed={0: "BH"})
        return outs[0], jax.tree.unflatten(holder["tree"], outs[1:])

    def kl_bwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl, saved):
        leaves, tree = jax.tree.flatten(saved)
        saved_layouts = self.inner.kl_saved_layouts(q, k, index_q)

        def f(q, k, iq, ik, bi, lse, dkl, *rest):
            pos, kept = rest[:3], jax.tree.unflatten(tree, rest[3:])
            return self.inner.kl_bwd(q, k, iq, ik, bi, lse, Positions(*pos), cfg, dkl, kept)

        # index_k is one head shared by all groups: each head shard holds part of its gradient.
        return shard_local_call(
            f, (q, k, index_q, index_k, block_indices, lse, dkl, *positions, *leaves),
            (_Q, _KV, _IQ, _IK, _BI, _LSE, "", *_POS, *saved_layouts), (_IQ, _IK), summed={1: "H"},
        )

    def paged_select_blocks(self, index_q, index_pages, positions, cfg):
        return self.inner.paged_select_blocks(index_q, index_pages, positions, cfg)

    def paged_attention_fwd(self, q, kv_pages, block_indices, positions, cfg):
        return self.inner.paged_attention_fwd(q, kv_pages, block_indices, positions, cfg)
