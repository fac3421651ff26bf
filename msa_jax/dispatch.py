"""Implementation registry, the choice among implementations, and the shard_map boundary.

An implementation is an object with the methods of `Implementation`. The public ops name
an ordered list of implementations; the first whose `supports(call)` returns None and
whose trace does not raise `NotImplementedError` serves the call. Below this layer
nothing validates user input again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .config import CallInfo

KNOWN = ("xla", "pallas", "cuda")


class Implementation:
    """What an implementation provides; all methods take validated, canonical arguments.

    Shapes follow the spec (BTNH); `positions` is a `config.Positions`, `cfg` an
    `MSAConfig`. Raise NotImplementedError from `supports` (as a returned reason) or while
    tracing to let the dispatcher try the next implementation.
    """

    name: str = ""

    def kl_saved_layouts(self, q, k, index_q) -> tuple[str, ...]:
        """One layout string per leaf of kl_fwd's `saved` for these inputs (letters as in
        `partitioning.shard_local_call`), so automatic sharding can split it like the other
        arrays. Default: kl_fwd saves nothing."""
        return ()

    def supports(self, call: CallInfo) -> str | None:
        """None if this implementation serves `call`, else a one-line reason."""
        raise NotImplementedError

    def select_blocks(self, index_q, index_k, positions, cfg):
        """int32 [B, T, Hkv, top_k] rows of the spec."""
        raise NotImplementedError

    def attention_fwd(self, q, k, v, block_indices, positions, cfg):
        """(out [B, T, Hq, D] in q.dtype, lse float32 [B, T, Hq])."""
        raise NotImplementedError

    def dense_attention(self, q, k, v, cfg):
        """(out, lse) as `attention_fwd` gives them in dense mode, for plain causal positions
        (T == S, query i at key i, no padding, one document: `CallInfo.plain_causal`), from a
        dense attention kernel that carries its own gradients; or None (the default) to run
        the main branch through attention_fwd / attention_bwd over every block."""
        return None

    def attention_lse(self, q, k, block_indices, positions, cfg):
        """lse float32 [B, T, Hq] alone (the KL teacher's normaliser)."""
        raise NotImplementedError

    def attention_bwd(self, q, k, v, block_indices, positions, cfg, out, lse, dout, dlse):
        """(dq, dk, dv) in the dtypes of q, k, v."""
        raise NotImplementedError

    def dense_kl_fwd(self, q, k, index_q, index_k, lse, cfg):
        """kl_fwd's (value, saved) in dense mode over plain causal positions, from kernels that
        walk the causal triangle without work lists; or None (the default) for kl_fwd over
        every block. `saved` as kl_fwd's, for this implementation's kl_bwd."""
        return None

    def kl_value(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        """The float32 scalar sum over valid (query, group) rows of KL(P || R), unnormalised,
        when nothing differentiates it. Default: kl_fwd's value."""
        return self.kl_fwd(q, k, index_q, index_k, block_indices, lse, positions, cfg)[0]

    def kl_fwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        """(value, saved) under differentiation: value as kl_value; saved whatever the
        implementation's kl_bwd wants kept from this pass (a pytree of arrays, or None). An
        implementation whose gradient pass yields the value too may run it here and save the
        gradients for dkl = 1: kl_bwd then only scales them, and when the loss does not use
        the KL, JAX never calls kl_bwd and XLA drops the pass with its unused outputs."""
        raise NotImplementedError

    def kl_bwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl, saved):
        """(d index_q, d index_k) for cotangent `dkl` of `kl_fwd`'s sum; `saved` as kl_fwd gave it."""
        raise NotImplementedError

    # Paged caches (spec, "Inference"): inference only, no backward. An implementation
    # without them keeps these defaults, and the dispatcher falls through to the next one.

    def paged_select_blocks(self, index_q, index_pages, positions, cfg):
        """int32 [B, T, Hkv, top_k] rows of the spec over a `config.IndexPages` cache; block
        ids are logical page ids."""
        raise NotImplementedError(f"{self.name} has no paged select_blocks")

    def paged_attention_fwd(self, q, kv_pages, block_indices, positions, cfg):
        """(out [B, T, Hq, D] in q.dtype, lse float32 [B, T, Hq]) over a `config.KVPages`
        cache; block_indices hold logical page ids."""
        raise NotImplementedError(f"{self.name} has no paged block-sparse attention")


_REGISTRY: dict[str, Implementation] = {}


def scale_saved_kl_gradients(index_q, index_k, dkl, saved):
    """kl_bwd of an implementation whose kl_fwd saved the KL's gradients for dkl = 1 as
    (d index_q [B, T, Hkv, Di], d index_k per kv head [B, S, Hkv, Di]), float32 (kl_saved_layouts
    ("BTHD", "BSHD")): both scaled by dkl, d index_k summed over the heads, in the index dtypes."""
    d_iq, d_ik = saved
    return (d_iq * dkl).astype(index_q.dtype), (jnp.sum(d_ik, axis=2) * dkl).astype(index_k.dtype)


def register(impl: Implementation) -> None:
    """Makes `impl` selectable by its name."""
    _REGISTRY[impl.name] = impl


def implementation(name: str) -> Implementation:
    """The registered implementation called `name` (KeyError if none is)."""
    return _REGISTRY[name]


def default_order(platform: str) -> tuple[str, ...]:
    """Fastest first. On a GPU, cuda then pallas: as measured (benchmarks/results, H200, configs
    A and B, 8K to 128K), the CUDA indexer and attention forward beat Pallas's in every case
    (config A, 128K: indexer 17.7 vs 19.0 ms, sparse forward 47.0 vs 52.9 ms); ops or shapes
    the CUDA kernels do not serve fall through to pallas. On CPU only `xla` is fast; Pallas
    there runs in interpret mode."""
    if platform in ("gpu", "cuda", "rocm"):
        return ("cuda", "pallas", "xla")
    return ("xla",)


def resolve(implementation, platform: str) -> tuple[str, ...]:
    """Normalises the public `implementation` argument (validated by validation.py)."""
    if implementation is None:
        return default_order(platform)
    if isinstance(implementation, str):
        return (implementation,)
    return tuple(implementation)


def run(op: str, call: CallInfo, names: Sequence[str], fn: Callable[[Implementation], Any]):
    """Calls fn(impl) with the first implementation that serves `call`."""
    reasons = []
    for name in names:
        impl = _REGISTRY.get(name)
        if impl is None:
            reasons.append(f"{name}: not registered")
            continue
        reason = impl.supports(call)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
            continue
        try:
            return fn(_auto_sharded(impl))
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError(f"no implementation can serve {op}: " + "; ".join(reasons))


def _auto_sharded(impl: Implementation) -> Implementation:
    """impl with its methods split by jit's partitioner over batch and heads
    (partitioning.py); imported here because partitioning builds on this module. With one
    device there is nothing to split: impl as it is, so a single-device program holds the
    implementation's own calls, unchanged."""
    if jax.device_count() < 2:
        return impl
    from .partitioning import AutoSharded

    return AutoSharded(impl)


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, tuple) else (spec_entry,)


def shard_local(fn, args, layouts, out_layouts, *, summed_outputs=()):
    """Runs fn shard-locally when the inputs are sharded over batch and/or heads.

    `layouts` / `out_layouts` give, per (flattened) argument and output, one letter per
    dimension: "B" batch, "H" heads (query heads and kv heads are split alike, so each shard
    holds whole GQA groups), anything else unsharded. Arguments that are None stay None. The
    mesh axes come from the first argument's sharding in explicit-sharding mode
    (`jax.set_mesh` with `AxisType.Explicit`). Outputs listed in `summed_outputs` are
    scalars summed over every shard. With no explicit mesh the call runs as is: with
    several devices `run` gave fn an implementation whose every call is a custom_partitioning
    op (partitioning.py), which jit's partitioner splits over batch and heads. Inside this shard_map those ops
    lower to the plain call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    spec = jax.typeof(args[0]).sharding.spec
    first = layouts[0]
    batch = _mesh_axes(spec[first.index("B")]) if len(spec) > first.index("B") else ()
    heads = _mesh_axes(spec[first.index("H")]) if len(spec) > first.index("H") else ()
    if not batch and not heads:
        return fn(*args)

    def to_spec(layout):
        if layout is None:
            return None
        dims = []
        for letter in layout:
            axes = batch if letter == "B" else heads if letter == "H" else ()
            dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*dims)

    present = [i for i, a in enumerate(args) if a is not None]
    in_specs = tuple(to_spec(layouts[i]) for i in present)
    all_axes = batch + heads
    # A summed scalar leaves as one partial per device ([1] * len(all_axes) locally) and is
    # added up outside: no psum inside, so no psum has to be transposed (see check_vma).
    out_specs = tuple(P(*all_axes) if i in summed_outputs else to_spec(l) for i, l in enumerate(out_layouts))

    def local(*local_args):
        full = [None] * len(args)
        for i, a in zip(present, local_args):
            full[i] = a
        outs = list(fn(*full))
        for i in summed_outputs:
            outs[i] = outs[i].reshape((1,) * len(all_axes))
        return tuple(outs)

    # Explicit-mode shard_map wants inputs laid out as in_specs say. Arguments the caller
    # sharded differently (or not at all, like the canonical positions) are moved here;
    # q, k, v sharded over batch/heads already match, so nothing large moves.
    local_args = [jax.sharding.reshard(args[i], spec) for i, spec in zip(present, in_specs)]
    # check_vma=False: Pallas kernels declare their outputs without a varying-axes type,
    # which the check rejects. Without it, the cotangent of an input replicated over an axis
    # (index_k over the head axis) is summed over that axis by shard_map's transpose.
    outs = list(jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*local_args))
    for i in summed_outputs:
        outs[i] = jnp.sum(outs[i])
    return tuple(outs)
