"""GPU time per kernel inside one of bench.py's ops, from JAX's own profiler (no nsys needed).

Runs the op's jitted function a few times under `jax.profiler.trace`, reads the trace back
with `jax.profiler.ProfileData`, and sums the device events of the GPU plane per kernel name,
divided by the number of calls: a step's time split into the kernels that make it up, the
custom calls and the XLA fusions around them alike.

    python benchmarks/profile_ops.py --config A --n 32768 131072 --ops msa_fwd_bwd_kl --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def kernel_times(trace_dir: str) -> dict[str, tuple[float, int]]:
    """{kernel name: (total ms, count)} over the GPU planes of the newest trace in trace_dir."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}: did the profiler run?")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    seen = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            seen.append(f"{plane.name} / {line.name}")
            # The per-stream lines hold the kernels; "XLA Ops" / "XLA Modules" lines repeat
            # them as HLO ops and whole programs, which would count the time twice.
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                entry = totals[event.name]
                entry[0] += event.duration_ns / 1e6
                entry[1] += 1
    if not totals:
        raise RuntimeError(f"no kernel events on a GPU stream line; the trace's GPU lines: {seen}")
    return {name: (ms, count) for name, (ms, count) in totals.items()}


def profile(op: str, impl: str, cfg: bench.Config, n: int, calls: int, deterministic: bool) -> dict:
    names = bench.OP_INPUTS[op]
    base = bench.make_inputs(cfg, n, 1, jax.numpy.bfloat16, names, seed=0)
    if "block_indices" in names:
        base["block_indices"] = bench.fixed_selection(base, cfg)
    fn = jax.jit(bench.op_function(op, impl, cfg, deterministic))
    args = [base[name] for name in names]
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        times = kernel_times(trace_dir)
    rows = sorted(((ms / calls, count / calls, name) for name, (ms, count) in times.items()), reverse=True)
    return {
        "op": op, "impl": impl, "n": n, "calls": calls, "deterministic": deterministic,
        "total_ms_per_call": sum(r[0] for r in rows),
        "kernels": [{"name": name, "ms_per_call": ms, "launches_per_call": count} for ms, count, name in rows],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    parser.add_argument("--n", nargs="+", type=int, default=[32768])
    parser.add_argument("--ops", nargs="+", default=["msa_fwd_bwd_kl"], choices=bench.MSA_OPS + bench.BASELINE_OPS)
    parser.add_argument("--impl", default="cuda")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--top", type=int, default=25, help="kernels printed per case")
    parser.add_argument("--out", help="folder for one JSON per case")
    args = parser.parse_args(argv)
    cfg = bench.CONFIGS[args.config]
    for n in args.n:
        for op in args.ops:
            impl = "cudnn" if op in bench.BASELINE_OPS else args.impl
            result = profile(op, impl, cfg, n, args.calls, args.deterministic)
            commit, dirty = bench.git_state()
            result.update(config=args.config, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                          git_commit=commit, git_dirty=dirty, command=" ".join(["benchmarks/profile_ops.py", *sys.argv[1:]]))
            print(f"config {args.config} N={n} {op} ({impl}): {result['total_ms_per_call']:.1f} ms of kernels per call")
            for k in result["kernels"][:args.top]:
                print(f"  {k['ms_per_call']:9.2f} ms  x{k['launches_per_call']:<5g} {k['name'][:150]}")
            if args.out:
                path = Path(args.out) / f"profile-{args.config}-{op}-{impl}-{n}-{commit[:7]}.json"
                path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
