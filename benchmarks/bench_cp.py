"""Context-parallel benchmark (issue #16 item 3): MSA with one sequence split over devices.

Times `context_parallel_sparse_attention` (forward, and the training step: the gradient of
sum(out * w) + kl_loss) with the sequence split over the first `--devices` devices of one
mesh axis, and the same ops through `sparse_attention` on one device where they fit, for a
bench.py config (A on the GPU, tiny on CPU host devices). Records per-device memory as XLA
plans it (for an SPMD program `memory_analysis` reports one device's share) and writes one
JSON per run (schema below) to benchmarks/results/cp/; readme_table.py does not read that
folder.

Inputs are standard-normal, created already split over the mesh (no device holds the whole
q). Random tokens need no zig-zag permutation: any order is as good as another, so the
single-device case times the same arrays. A case that fails (out of memory, an unsupported
shape) is recorded with its error and the run goes on.

    # 8 GPUs, config A at 1M tokens, against one GPU:
    python benchmarks/bench_cp.py --config A --n 1048576 --devices 8 --single --out benchmarks/results/cp
    # CPU smoke run on 4 host devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python benchmarks/bench_cp.py --config tiny --n 256 --devices 4 --impl xla --single

JSON: {schema_version, device, device_count (used), backend, jax_version, git_commit,
git_dirty, date, command, settings, config, cases: [{op, n, devices, impl, status ("ok" or
"error"), median_s, times_s, compile_s, memory (bench.device_bytes: per-device bytes),
error}]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 (the harness this extends: configs, timing, git state, JSON writing)

import msa_jax  # noqa: E402
from msa_jax.dispatch import KNOWN  # noqa: E402

SCHEMA_VERSION = 1
OUT_DIR = bench.RESULTS_DIR / "cp"
OPS = ("fwd", "fwd_bwd_kl")
AXIS = "seq"


def make_inputs(cfg: bench.Config, n: int, dtype, mesh: Mesh | None) -> list[jax.Array]:
    """q, k, v, index_q, index_k, w: standard normal, split over the sequence along AXIS of
    `mesh` (or on the default device when mesh is None), created in place."""
    shapes = bench.input_shapes(cfg, n, 1)
    names = ("q", "k", "v", "index_q", "index_k", "w")

    def draw(key):
        return [jax.random.normal(jax.random.fold_in(key, i), shapes[name], dtype) for i, name in enumerate(names)]

    out_shardings = None
    if mesh is not None:
        out_shardings = [NamedSharding(mesh, P(None, AXIS, *([None] * (len(shapes[name]) - 2)))) for name in names]
    return jax.jit(draw, out_shardings=out_shardings)(jax.random.key(0))


def op_function(op: str, cfg: bench.Config, impl: str, mesh: Mesh | None, kv_fetch_blocks: int | None = None):
    """The jitted function `op` times, on (q, k, v, index_q, index_k, w): through
    context_parallel_sparse_attention over `mesh` (with `kv_fetch_blocks`), or
    sparse_attention when mesh is None."""
    options = dict(top_k=cfg.top_k, block_size=cfg.block_size, implementation=impl)

    def msa(q, k, v, index_q, index_k):
        if mesh is None:
            return msa_jax.sparse_attention(q, k, v, index_q, index_k, **options)
        return msa_jax.context_parallel_sparse_attention(q, k, v, index_q, index_k, mesh=mesh, axis=AXIS,
                                                         kv_fetch_blocks=kv_fetch_blocks, **options)

    def fwd(q, k, v, index_q, index_k, w):
        del w
        return msa(q, k, v, index_q, index_k).out

    def loss(q, k, v, index_q, index_k, w):
        res = msa(q, k, v, index_q, index_k)
        return bench.weighted_sum(res.out, w) + res.kl_loss

    fn = {"fwd": fwd, "fwd_bwd_kl": jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))}[op]
    return jax.jit(fn)


def run_case(op: str, cfg: bench.Config, impl: str, mesh: Mesh | None, inputs, args,
             kv_fetch_blocks: int | None = None) -> dict:
    """One timed case; an exception is recorded, not raised."""
    case = {"op": op, "n": inputs[0].shape[1], "devices": 1 if mesh is None else mesh.size, "impl": impl,
            "kv_fetch_blocks": kv_fetch_blocks}
    try:
        fn = op_function(op, cfg, impl, mesh, kv_fetch_blocks)
        compiled = fn.lower(*inputs).compile()
        case["memory"] = bench.device_bytes(compiled)
        compile_s, times, _, _ = bench.time_calls(compiled, [inputs], warmup=args.warmup, repeats=args.repeats,
                                                  time_limit=args.time_limit)
        case.update(status="ok", median_s=statistics.median(times), times_s=times, compile_s=compile_s)
    except Exception as e:  # noqa: BLE001 (record the failure, e.g. out of memory, and go on)
        case.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    return case


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    p.add_argument("--n", nargs="+", type=int, default=[1 << 20], help="T = S, tokens (a multiple of 2 * devices)")
    p.add_argument("--devices", type=int, default=None, help="devices on the sequence axis (default: all)")
    p.add_argument("--impl", nargs="+", default=["cuda"], choices=KNOWN)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--single", action="store_true", help="also time each op on one device (where it fits)")
    p.add_argument("--kv-fetch-blocks", nargs="+", type=int, default=[], metavar="C",
                   help="also time the split ops fetching only the selected K/V blocks, at most C per device pair "
                        "(context_parallel_sparse_attention's kv_fetch_blocks); the whole gather always runs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per case before no new call starts")
    p.add_argument("--out", type=Path, help="JSON path, or a folder (default benchmarks/results/cp/)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the benchmark; returns the run record it wrote."""
    args = parse_args(argv)
    available = jax.devices()
    count = args.devices or len(available)
    if not 1 <= count <= len(available):
        raise SystemExit(f"--devices {count}: this process sees {len(available)} devices")
    mesh = Mesh(np.array(available[:count]), (AXIS,))
    cfg, dtype = bench.CONFIGS[args.config], jnp.dtype(args.dtype)
    device = available[0].device_kind
    now = datetime.datetime.now(datetime.timezone.utc)
    if args.out is None or args.out.is_dir():
        out_path = bench.default_out_path(f"cp-{count}x-{device}", now, args.out or OUT_DIR)
    else:
        out_path = args.out
    commit, dirty = bench.git_state()
    run = {
        "schema_version": SCHEMA_VERSION, "device": device, "device_count": count,
        "backend": jax.default_backend(), "jax_version": jax.__version__,
        "git_commit": commit, "git_dirty": dirty, "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv if argv is None else ["benchmarks/bench_cp.py", *argv]),
        "settings": {"dtype": args.dtype, "batch": 1, "repeats": args.repeats, "warmup": args.warmup,
                     "time_limit_s": args.time_limit, "mesh_axis": AXIS},
        "config": {args.config: dataclasses.asdict(cfg)},
        "cases": [],
    }
    print(f"{count} x {device} ({jax.default_backend()}), jax {jax.__version__}, commit {commit[:12]}; "
          f"writing {out_path}", flush=True)
    for n in args.n:
        layouts = [mesh] + ([None] if args.single else [])
        for layout in layouts:
            inputs = make_inputs(cfg, n, dtype, layout)
            fetches = [None] + (args.kv_fetch_blocks if layout is not None else [])
            for impl in args.impl:
                for fetch in fetches:
                    for op in args.ops:
                        case = run_case(op, cfg, impl, layout, inputs, args, fetch)
                        run["cases"].append(case)
                        bench.write_json(out_path, run)
                        shown = f"{case['median_s'] * 1e3:.2f} ms" if case["status"] == "ok" else case["error"][:200]
                        how = "" if fetch is None else f" kv_fetch_blocks={fetch}"
                        print(f"  N={n} {case['devices']} device(s) {impl}{how} {op}: {shown}", flush=True)
            for x in inputs:
                x.delete()
            jax.clear_caches()
    run["finished"] = True
    bench.write_json(out_path, run)
    return run


if __name__ == "__main__":
    main()
