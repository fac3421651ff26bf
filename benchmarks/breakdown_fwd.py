"""Splits the KV-outer sparse-attention forward's time into its stages, on a GPU.

Stages (msa_jax/kv_outer/partials.py `chunked`, shared by pallas and cuda): the work
list (selection inverted by key tile, jnp), the partials kernel, the log-sum-exp combine,
and the whole forward of the first query chunk. Each is jitted and timed alone on the
same inputs, next to the bytes it must move at least.

    python benchmarks/breakdown_fwd.py --config A --n 131072 --impl cuda pallas
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import msa_jax  # noqa: E402
from msa_jax import cuda as cuda_impl  # noqa: E402
from msa_jax import positions as pos_lib  # noqa: E402
from msa_jax.config import MSAConfig  # noqa: E402
from msa_jax.ffi import ops  # noqa: E402
from msa_jax.kv_outer import partials as kv_partials, worklist  # noqa: E402
from msa_jax.pallas import attention_fwd, common  # noqa: E402


def median_ms(fn, args) -> float:
    _, times, _, _ = bench.time_calls(jax.jit(fn), [args], warmup=2, repeats=10, time_limit=60.0)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    parser.add_argument("--n", nargs="+", type=int, default=[32768])
    parser.add_argument("--impl", nargs="+", default=["cuda", "pallas"], choices=["cuda", "pallas"])
    parser.add_argument("--item-steps", nargs="+", type=int, default=[cuda_impl._ITEM_STEPS],
                        help="cuda: the most 64-row steps per work item (CTA), one line per value")
    args = parser.parse_args(argv)
    c = bench.CONFIGS[args.config]
    if "cuda" in args.impl:
        msa_jax.ffi.register_targets()  # the kernel is called below without the dispatcher
    for n in args.n:
        x = bench.make_inputs(c, n, 1, jnp.bfloat16, ("q", "k", "v", "index_q", "index_k"), seed=0)
        bi = bench.fixed_selection(x, c)
        cfg = MSAConfig(top_k=c.top_k, block_size=c.block_size)
        positions = pos_lib.canonicalize(None, None, None, batch=1, q_len=n, kv_len=n)
        qpos, doc, valid = pos_lib.query_coords(positions, n)
        hi = pos_lib.last_visible_key(positions, qpos, valid)
        chunk = kv_partials.query_chunk(n, c.top_k * c.num_q_heads * (c.head_dim * 2 + 4))
        per_slot = chunk * c.top_k * c.num_q_heads * c.head_dim * 2 / 1e9  # GB of one pass over the partials
        sl = (slice(None), slice(0, chunk))
        print(f"config {args.config} N={n} chunk={chunk} of {-(-n // chunk)} chunks", flush=True)
        variants = [(impl, steps) for impl in args.impl for steps in (args.item_steps if impl == "cuda" else [None])]
        for impl, steps in variants:
            if impl == "cuda":
                rows = cuda_impl.item_rows(c.group_size, steps)
                kp, vp = x["k"], x["v"]
                partials = functools.partial(cuda_impl._partials, scale=cfg.scale(c.head_dim), block_size=c.block_size,
                                             packed=False, item_steps=steps)

                def kernel(q, k, v, hi, wl):
                    return ops.sparse_attention_partials(q, k, v, hi, wl, q_base=0, top_k=c.top_k,
                                                         block_size=c.block_size, softmax_scale=cfg.scale(c.head_dim))
            else:
                tiles = common.attention_tiles(c.group_size, c.head_dim)
                rows = tiles.rows * tiles.item_steps
                kp, vp = common.pad_keys(x["k"], c.block_size), common.pad_keys(x["v"], c.block_size)
                partials = functools.partial(attention_fwd._partials, cfg=cfg, kv_len=n, packed=False, interpret=False)
                kernel = None

            def build(bi):
                return worklist.build(bi[sl], qpos[sl], doc[sl], valid[sl], kv_len=n, block_size=c.block_size,
                                      rows=rows, packed=False)

            def first_chunk(q, k, v, bi):
                o, lse, ok = partials(q, k, v, hi, 0, bi[sl], qpos[sl], doc[sl], valid[sl])
                return kv_partials.combine(o, lse, ok, c.num_kv_heads)

            t_wl = median_ms(build, (bi,))
            o, lse, ok = jax.jit(lambda q, k, v, bi: partials(q, k, v, hi, 0, bi[sl], qpos[sl], doc[sl], valid[sl]))(
                x["q"], kp, vp, bi)
            t_combine = median_ms(lambda o, lse, ok: kv_partials.combine(o, lse, ok, c.num_kv_heads), (o, lse, ok))
            del o, lse, ok
            t_first = median_ms(first_chunk, (x["q"], kp, vp, bi))
            name = impl if steps is None else f"{impl} ({steps} steps per item)"
            line = f"  {name} worklist {t_wl:7.3f} ms | combine {t_combine:7.3f} ms (reads >= {per_slot:.1f} GB)"
            if kernel is not None:
                wl = jax.jit(build)(bi)
                t_kernel = median_ms(kernel, (x["q"], kp, vp, hi, wl))
                line += f" | kernel {t_kernel:7.3f} ms (writes >= {per_slot:.1f} GB)"
                del wl
            print(line + f" | first chunk {t_first:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
