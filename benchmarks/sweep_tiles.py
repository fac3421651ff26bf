"""Times the Pallas forward kernels under several tile choices, one config and N, on a GPU.

The tile choices live in msa_jax/pallas/common.py (`attention_tiles`, `indexer_tiles`);
this script replaces those two functions with each candidate in turn, times
`block_sparse_attention` (fixed selections) and `select_blocks`, and checks every
candidate's result against the package's default tiles so a fast wrong variant shows up
as an error, not a win. Use it to pick the defaults; bench.py records the chosen ones.

    python benchmarks/sweep_tiles.py --config A --n 32768 --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import msa_jax  # noqa: E402
from msa_jax.pallas import common  # noqa: E402


def attention_candidates(group: int):
    """(matrix rows, warps, stages, item steps) to try; rows = matrix rows // G queries."""
    yield common.AttentionTiles(rows=max(1, 64 // group), matrix_rows=64, num_warps=4, num_stages=1, item_steps=1)
    for matrix_rows, warps in ((64, 4), (128, 8)):
        for stages, steps in itertools.product((1, 2), (4, 16, 64)):
            if matrix_rows >= group:
                yield common.AttentionTiles(rows=matrix_rows // group, matrix_rows=matrix_rows, num_warps=warps,
                                            num_stages=stages, item_steps=steps)


def indexer_candidates():
    for block_q, warps, stages in itertools.product((64, 128), (4, 8), (2, 3)):
        yield common.Tiles(block_q=block_q, num_warps=warps, num_stages=stages)


def median_time(fn, args, repeats: int) -> float:
    _, times, _, _ = bench.time_calls(fn, [args], warmup=2, repeats=repeats, time_limit=60.0)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--which", nargs="+", default=["attention", "indexer"], choices=["attention", "indexer"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = bench.CONFIGS[args.config]
    names = ("q", "k", "v", "index_q", "index_k")
    x = bench.make_inputs(cfg, args.n, 1, jnp.bfloat16, names, seed=0)
    block_indices = bench.fixed_selection(x, cfg)
    support = bench.support_size_sum(block_indices, block_size=cfg.block_size, num_keys=args.n)
    attn_flops = bench.case_flops("sparse_fwd", cfg, args.n, 1, support)
    idx_flops = bench.case_flops("indexer", cfg, args.n, 1, None)

    def attention(q, k, v, bi):
        return msa_jax.block_sparse_attention(q, k, v, bi, block_size=cfg.block_size, implementation="pallas")

    def indexer(iq, ik):
        return msa_jax.select_blocks(iq, ik, top_k=cfg.top_k, block_size=cfg.block_size, implementation="pallas")

    default_attention, default_indexer = common.attention_tiles, common.indexer_tiles
    rows = []
    if "attention" in args.which:
        attn_args = (x["q"], x["k"], x["v"], block_indices)
        want = jax.jit(attention)(*attn_args)
        for tiles in attention_candidates(cfg.group_size):
            common.attention_tiles = lambda group, head_dim, tiles=tiles: tiles
            jax.clear_caches()  # the jitted function is the same Python object each time
            try:
                fn = jax.jit(attention)
                err = rel_err(fn(*attn_args), want)
                t = median_time(fn, attn_args, args.repeats)
                rows.append(dict(kernel="attention", tiles=dataclasses.asdict(tiles), ms=t * 1e3,
                                 tflops=attn_flops / t / 1e12, rel_err_vs_default=err))
            except Exception as e:  # noqa: BLE001 (a candidate that fails to compile is a result)
                rows.append(dict(kernel="attention", tiles=dataclasses.asdict(tiles), error=f"{type(e).__name__}: {e}"[:500]))
            finally:
                common.attention_tiles = default_attention
            print(rows[-1], flush=True)
    if "indexer" in args.which:
        idx_args = (x["index_q"], x["index_k"])
        want = np.asarray(jax.jit(indexer)(*idx_args))
        for tiles in indexer_candidates():
            common.indexer_tiles = lambda q_len, index_head_dim, tiles=tiles: tiles
            jax.clear_caches()
            try:
                fn = jax.jit(indexer)
                mismatch = float(np.mean(np.any(np.asarray(fn(*idx_args)) != want, axis=-1)))
                t = median_time(fn, idx_args, args.repeats)
                rows.append(dict(kernel="indexer", tiles=dataclasses.asdict(tiles), ms=t * 1e3,
                                 tflops=idx_flops / t / 1e12, rows_differing_from_default=mismatch))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kernel="indexer", tiles=dataclasses.asdict(tiles), error=f"{type(e).__name__}: {e}"[:500]))
            finally:
                common.indexer_tiles = default_indexer
            print(rows[-1], flush=True)
    record = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, config=args.config, n=args.n,
                  command=" ".join(["benchmarks/sweep_tiles.py", *(argv if argv is not None else sys.argv[1:])]),
                  commit=bench.git_state()[0], rows=rows)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\n{'kernel':10s} {'tiles':70s} {'ms':>8s} {'TFLOP/s':>8s}  check")
    for r in rows:
        check = r.get("rel_err_vs_default", r.get("rows_differing_from_default", ""))
        line = f"{r['ms']:8.3f} {r['tflops']:8.1f}  {check:.2e}" if "ms" in r else "  error: " + r["error"][:60]
        print(f"{r['kernel']:10s} {str(tuple(r['tiles'].values())):70s} {line}")


if __name__ == "__main__":
    main()
