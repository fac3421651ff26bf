"""Splits the KL loss's time on a GPU: its work list, the value pass alone, and value plus
gradient, per implementation, on config inputs with a fixed selection.

index_kl_loss with a precomputed teacher lse (the forward's, as sparse_attention passes
it), so only the KL's own work is timed:

    python benchmarks/breakdown_kl.py --config A --n 32768 131072 --impl cuda pallas
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
from msa_jax import autodiff, dispatch  # noqa: E402
from msa_jax import positions as pos_lib  # noqa: E402
from msa_jax.config import MSAConfig  # noqa: E402
from msa_jax.kv_outer import worklist  # noqa: E402


def median_ms(fn, args) -> float:
    _, times, _, _ = bench.time_calls(jax.jit(fn), [args], warmup=2, repeats=5, time_limit=60.0)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    parser.add_argument("--n", nargs="+", type=int, default=[32768])
    parser.add_argument("--impl", nargs="+", default=["cuda", "pallas"], choices=["cuda", "pallas", "xla"])
    args = parser.parse_args(argv)
    c = bench.CONFIGS[args.config]
    for n in args.n:
        x = bench.make_inputs(c, n, 1, jnp.bfloat16, ("q", "k", "v", "index_q", "index_k"), seed=0)
        bi = bench.fixed_selection(x, c)
        cfg = MSAConfig(top_k=c.top_k, block_size=c.block_size)
        pos = pos_lib.canonicalize(None, None, None, batch=1, q_len=n, kv_len=n)
        qpos, doc, valid = pos_lib.query_coords(pos, n)
        # Every array is an argument of the jitted function, never a closed-over constant: XLA
        # would otherwise constant-fold the work list's sort at compile time.
        t_work = median_ms(lambda *a: worklist.build(*a, kv_len=n, block_size=c.block_size, rows=1024,
                                                     packed=False).item_count, (bi, qpos, doc, valid))
        print(f"config {args.config} N={n}: work list {t_work:.1f} ms", flush=True)
        for name in args.impl:
            impl = dispatch._REGISTRY[name]
            lse = jax.jit(lambda q, k, v, bi, pos: impl.attention_fwd(q, k, v, bi, pos, cfg)[1])(
                x["q"], x["k"], x["v"], bi, pos)

            def kl(iq, ik, q, k, bi, lse, pos):
                return autodiff.kl_sum(impl, cfg, q, k, iq, ik, bi, lse, *pos)

            kl_args = (x["index_q"], x["index_k"], x["q"], x["k"], bi, lse, pos)
            t_value = median_ms(kl, kl_args)
            t_both = median_ms(jax.grad(kl, argnums=(0, 1)), kl_args)
            print(f"  {name}: value {t_value:.1f} ms, value + gradient {t_both:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
