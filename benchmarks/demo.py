"""`make demo`: run sparse_attention with every available implementation on random inputs,
check each against the `xla` reference, and time it against dense causal attention.

Small on CPU (T = S = 1024 tokens in 16 blocks of 64, top_k 4, so sparse mode really drops
blocks; Pallas runs in interpret mode there, which is slow, hence the size), 32K on a GPU
with config A's top_k 16 x block 128. Times are medians of a few runs after a warm-up; on
CPU they only show that everything runs and agrees, not how fast a GPU would be.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax.dispatch import KNOWN


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768 if on_gpu else 1024)
    parser.add_argument("--top-k", type=int, default=16 if on_gpu else 4)
    parser.add_argument("--block-size", type=int, default=128 if on_gpu else 64)
    parser.add_argument("--q-heads", type=int, default=64 if on_gpu else 8)
    parser.add_argument("--kv-heads", type=int, default=4 if on_gpu else 2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5 if on_gpu else 2)
    parser.add_argument("--out", help="also write the table as JSON here (benchmarks/results/)")
    args = parser.parse_args()

    B, N, Hq, Hkv, D = 1, args.seq, args.q_heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    q, k, v = mk(B, N, Hq, D), mk(B, N, Hkv, D), mk(B, N, Hkv, D)
    index_q, index_k = mk(B, N, Hkv, 128), mk(B, N, 128)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}: B={B} T=S={N} Hq={Hq} Hkv={Hkv} "
          f"D={D} Di=128 top_k={args.top_k} block_size={args.block_size} bf16")

    dense_impl = "cudnn" if on_gpu else "xla"
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dense_impl))
    t_dense = median_time(dense, q, k, v, repeats=args.repeats)

    def run(impl):
        return jax.jit(lambda *a: msa_jax.sparse_attention(*a, top_k=args.top_k, block_size=args.block_size,
                                                           implementation=impl))

    reference = run("xla")(q, k, v, index_q, index_k)
    rows = [(f"dense causal ({dense_impl})", t_dense, "-", "-", "-")]
    for name in KNOWN:
        try:
            fn = run(name)
            res = fn(q, k, v, index_q, index_k)
        except NotImplementedError as e:
            print(f"{name}: not available ({e})")
            continue
        t = median_time(fn, q, k, v, index_q, index_k, repeats=args.repeats)
        out, want = np.asarray(res.out, np.float32), np.asarray(reference.out, np.float32)
        err = np.linalg.norm(out - want) / np.linalg.norm(want)
        same = np.mean(np.asarray(res.block_indices) == np.asarray(reference.block_indices))
        rows.append((f"msa {name}", t, f"{err:.1e}", f"{same:.4f}", f"{float(res.kl_loss):.4f}"))

    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        record = dict(
            kind="demo", device=jax.devices()[0].device_kind, backend=jax.default_backend(),
            jax_version=jax.__version__, commit=commit or "unknown",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
            config=dict(B=B, T=N, S=N, Hq=Hq, Hkv=Hkv, D=D, Di=128, top_k=args.top_k, block_size=args.block_size,
                        dtype="bfloat16"),
            rows=[dict(name=n, median_s=t, out_rel_err=e, same_blocks=s_, kl_loss=kl) for n, t, e, s_, kl in rows],
        )
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    print(f"\n{'implementation':<24}{'time ms':>10}{'vs dense':>10}{'out rel err':>13}{'same blocks':>13}{'kl_loss':>10}")
    for name, t, err, same, kl in rows:
        print(f"{name:<24}{t * 1e3:>10.1f}{t_dense / t:>9.2f}x{err:>13}{same:>13}{kl:>10}")


if __name__ == "__main__":
    main()
