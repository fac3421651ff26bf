"""Splits the Pallas sparse-attention forward's time into its stages, on a GPU.

Stages (msa_jax/pallas/attention_fwd.py): the worklist (selection inverted by key tile,
jnp), the log-sum-exp combine of the slot partials, and the whole forward of the first
query chunk; each is jitted and timed alone on the same inputs, and the kernel's share is
the difference, printed next to the bytes each stage must move at least.

    python benchmarks/breakdown_fwd.py --config A --n 32768 131072
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from msa_jax import positions as pos_lib  # noqa: E402
from msa_jax.config import MSAConfig  # noqa: E402
from msa_jax.pallas import attention_fwd, common, worklist  # noqa: E402


def median_ms(fn, args) -> float:
    _, times, _, _ = bench.time_calls(jax.jit(fn), [args], warmup=2, repeats=10, time_limit=60.0)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    parser.add_argument("--n", nargs="+", type=int, default=[32768])
    args = parser.parse_args(argv)
    c = bench.CONFIGS[args.config]
    for n in args.n:
        x = bench.make_inputs(c, n, 1, jnp.bfloat16, ("q", "k", "v", "index_q", "index_k"), seed=0)
        bi = bench.fixed_selection(x, c)
        cfg = MSAConfig(top_k=c.top_k, block_size=c.block_size)
        positions = pos_lib.canonicalize(None, None, None, batch=1, q_len=n, kv_len=n)
        qpos, doc, valid = pos_lib.query_coords(positions, n)
        hi = pos_lib.last_visible_key(positions, qpos, valid)
        tiles = common.attention_tiles(c.group_size, c.head_dim)
        chunk = common.query_chunk(n, c.top_k * c.num_q_heads * (c.head_dim * 2 + 4))

        def build(bi):
            return worklist.build(bi[:, :chunk], qpos[:, :chunk], doc[:, :chunk], valid[:, :chunk], kv_len=n,
                                  block_size=c.block_size, rows=tiles.rows * tiles.item_steps, packed=False)

        def full(q, k, v, bi):  # q_offset 0: the first `chunk` queries are the first chunk
            return attention_fwd.attention_fwd(q[:, :chunk], k, v, bi[:, :chunk], positions, cfg, interpret=False)

        def combine(o, lse, ok):
            return attention_fwd.combine(o, lse, ok, c.num_kv_heads)

        t_wl = median_ms(build, (bi,))
        o, lse, ok = jax.jit(lambda *a: attention_fwd._partials(*a[:4], 0, *a[4:], cfg, kv_len=n, packed=False,
                                                                interpret=False))(
            x["q"], attention_fwd.pad_kv(x["k"], c.block_size), attention_fwd.pad_kv(x["v"], c.block_size), hi,
            bi[:, :chunk], qpos[:, :chunk], doc[:, :chunk], valid[:, :chunk])
        t_combine = median_ms(combine, (o, lse, ok))
        del o, lse, ok
        t_full = median_ms(full, (x["q"], x["k"], x["v"], bi))
        per_slot = chunk * c.top_k * c.num_q_heads * c.head_dim * 2 / 1e9  # GB of one pass over the partials
        print(f"config {args.config} N={n} chunk={chunk} tiles={tiles}")
        print(f"  worklist {t_wl:8.3f} ms")
        print(f"  combine  {t_combine:8.3f} ms alone (moves >= {per_slot:.1f} GB)")
        print(f"  full - worklist - combine {t_full - t_wl - t_combine:8.3f} ms  (the kernel: moves >= "
              f"{2 * per_slot:.1f} GB)")
        print(f"  full     {t_full:8.3f} ms (the first chunk only, when chunk < N)", flush=True)


if __name__ == "__main__":
    main()
