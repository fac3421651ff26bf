"""Benchmark harness: times implementation x op x N x config against dense causal attention.

Every (config, N) first times the dense baselines (cuDNN on GPU, XLA elsewhere), then each
requested implementation on each op. The run is written as one JSON file (schema:
benchmarks/results/README.md), rewritten after every case so that a run cut short still
leaves its results; a compact table is printed at the end. What is counted and how to run
it on the lent GPU: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
import jaxlib

import msa_jax
from msa_jax.dispatch import KNOWN

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# Inputs smaller than ROTATE_BELOW bytes could stay resident in L2 (50 MB on H100 and H200)
# between calls and flatter the timing: such cases rotate among ROTATION_SETS input sets.
L2_BYTES = 50 * 2**20
ROTATE_BELOW = 4 * L2_BYTES
ROTATION_SETS = 3
# Calls shorter than this are timed in back-to-back groups (see time_calls), at most this many.
MIN_SAMPLE_S = 0.02
MAX_CALLS_PER_SAMPLE = 100

MSA_OPS = ("indexer", "sparse_fwd", "sparse_fwd_bwd", "msa_fwd", "msa_fwd_bwd_kl", "msa_dense_fwd_bwd_kl")
BASELINE_OPS = ("dense_fwd", "dense_fwd_bwd")
# Backward ops are compared with dense forward+backward, forward ops with dense forward.
BACKWARD_OPS = ("sparse_fwd_bwd", "msa_fwd_bwd_kl", "msa_dense_fwd_bwd_kl", "dense_fwd_bwd")
# The arrays each op reads, in argument order.
OP_INPUTS = {
    "indexer": ("index_q", "index_k"),
    "sparse_fwd": ("q", "k", "v", "block_indices"),
    "sparse_fwd_bwd": ("q", "k", "v", "block_indices", "w"),
    "msa_fwd": ("q", "k", "v", "index_q", "index_k"),
    "msa_fwd_bwd_kl": ("q", "k", "v", "index_q", "index_k", "w"),
    "msa_dense_fwd_bwd_kl": ("q", "k", "v", "index_q", "index_k", "w"),
    "dense_fwd": ("q", "k", "v"),
    "dense_fwd_bwd": ("q", "k", "v", "w"),
}
# Backward work counted as this multiple of the forward's (the FlashAttention convention).
BWD_FACTOR = 2.5
FLOP_CONVENTIONS = {
    "dense_fwd": "2*B*Hq*D*N^2 (causal: half of the full 4*B*Hq*D*N^2)",
    "dense_fwd_bwd": "2.5 x dense_fwd",
    "indexer": "B*Hkv*Di*N^2 (causal half of the index scores; top-k comparisons not counted)",
    "sparse_fwd": "4*G*D*support, support = keys visible to each (b, query, group) inside its "
    "selected blocks, summed (= 4*Hq*D*N*top_k*block_size when every row is full)",
    "sparse_fwd_bwd": "2.5 x sparse_fwd",
    "msa_fwd": "indexer + sparse_fwd; times the prefill forward: only `out` is used, so the KL "
    "value, which nothing requests, is not computed",
    "msa_fwd_bwd_kl": "indexer + sparse_fwd_bwd (the KL loss and its gradient are not counted)",
    "msa_dense_fwd_bwd_kl": "the dense warm-up's step (mode='dense'): indexer + dense_fwd_bwd (the KL over "
    "every visible key is not counted)",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One attention layer shape; names as in shared/spec/msa.md."""

    num_q_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    index_head_dim: int  # Di
    block_size: int
    top_k: int

    @property
    def group_size(self) -> int:  # G
        return self.num_q_heads // self.num_kv_heads


CONFIGS = {
    "A": Config(num_q_heads=64, num_kv_heads=4, head_dim=128, index_head_dim=128, block_size=128, top_k=16),
    "B": Config(num_q_heads=32, num_kv_heads=8, head_dim=128, index_head_dim=128, block_size=128, top_k=16),
    # CPU smoke tests only.
    "tiny": Config(num_q_heads=4, num_kv_heads=2, head_dim=16, index_head_dim=16, block_size=16, top_k=4),
}


# ---------------------------------------------------------------------------- inputs


def input_shapes(cfg: Config, n: int, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the random inputs (T = S = n, self-attention)."""
    Hq, Hkv, D, Di = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.index_head_dim
    return {
        "q": (batch, n, Hq, D),
        "k": (batch, n, Hkv, D),
        "v": (batch, n, Hkv, D),
        "index_q": (batch, n, Hkv, Di),
        "index_k": (batch, n, Di),
        "w": (batch, n, Hq, D),  # weights of the scalar whose gradient the backward ops take
    }


def make_inputs(cfg: Config, n: int, batch: int, dtype, names, seed: int) -> dict[str, jax.Array]:
    """Standard-normal arrays (never zeros) for `names`, drawn on the default device."""
    shapes = input_shapes(cfg, n, batch)
    key = jax.random.key(seed)
    return {
        name: jax.random.normal(jax.random.fold_in(key, i), shapes[name], dtype)
        for i, name in enumerate(shapes)
        if name in names
    }


def support_sizes(block_indices, *, block_size: int, num_keys: int):
    """int32 [B, T, Hkv]: keys each (query, group) attends to inside its selected blocks.

    The queries are the causal suffix of the keys (q_offset = num_keys - T). Each row is a
    set, as the spec reads it: -1 and ids outside [0, ceil(num_keys / block_size)) count
    nothing, and causality applies per key, so block j gives min(block_size, p + 1 - j *
    block_size) keys to a query at position p (block_size below the local block, p - L *
    block_size + 1 in the local block L).
    """
    T = block_indices.shape[1]
    num_blocks = -(-num_keys // block_size)
    positions = (num_keys - T) + jnp.arange(T, dtype=jnp.int32)
    visible_end = jnp.minimum(positions + 1, num_keys)[None, :, None, None]  # keys t < end are visible
    counts = jnp.clip(visible_end - block_indices * block_size, 0, block_size)
    valid = (block_indices >= 0) & (block_indices < num_blocks)
    return jnp.sum(jnp.where(valid, counts, 0), axis=-1)


def support_size_sum(block_indices, *, block_size: int, num_keys: int) -> int:
    """Sum of `support_sizes` over (b, query, group), in int64 (it passes 2^31 at 128K)."""
    sizes = support_sizes(block_indices, block_size=block_size, num_keys=num_keys)
    return int(np.asarray(sizes, np.int64).sum())


def fixed_selection(base: dict, cfg: Config):
    """block_indices of input set 0, shared by every sparse op's cases. The default
    implementation (the cuda indexer on a Hopper GPU, tested against the reference): the
    `xla` reference took minutes at 1M tokens. Its rows differ from the reference's only at
    near-ties, which changes no timing."""
    select = jax.jit(lambda index_q, index_k: msa_jax.select_blocks(
        index_q, index_k, top_k=cfg.top_k, block_size=cfg.block_size))
    return jax.block_until_ready(select(base["index_q"], base["index_k"]))


# ----------------------------------------------------------------------------- flops


def case_flops(op: str, cfg: Config, n: int, batch: int, support: int | None) -> float | None:
    """Useful FLOPs of one call (FLOP_CONVENTIONS); None for a sparse op of unknown support."""
    dense_fwd = 2.0 * batch * cfg.num_q_heads * cfg.head_dim * n * n
    indexer = 1.0 * batch * cfg.num_kv_heads * cfg.index_head_dim * n * n
    if op == "dense_fwd":
        return dense_fwd
    if op == "dense_fwd_bwd":
        return BWD_FACTOR * dense_fwd
    if op == "indexer":
        return indexer
    if op == "msa_dense_fwd_bwd_kl":
        return indexer + BWD_FACTOR * dense_fwd
    if support is None:
        return None
    sparse_fwd = 4.0 * cfg.group_size * cfg.head_dim * support
    return {
        "sparse_fwd": sparse_fwd,
        "sparse_fwd_bwd": BWD_FACTOR * sparse_fwd,
        "msa_fwd": indexer + sparse_fwd,
        "msa_fwd_bwd_kl": indexer + BWD_FACTOR * sparse_fwd,
    }[op]


# ------------------------------------------------------------------------------- ops


def weighted_sum(out, w):
    """A scalar whose gradient reaches every output element with a random weight."""
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))


def op_function(op: str, impl: str, cfg: Config, deterministic: bool = False):
    """The un-jitted function that `op` times, taking the arrays OP_INPUTS[op] names.
    deterministic: the ops' option of that name (bitwise-repeatable gradients)."""
    sparse = dict(block_size=cfg.block_size, deterministic=deterministic, implementation=impl)
    selection = dict(top_k=cfg.top_k, block_size=cfg.block_size, implementation=impl)
    msa_options = dict(selection, deterministic=deterministic)

    def indexer(index_q, index_k):
        return msa_jax.select_blocks(index_q, index_k, **selection)

    def sparse_fwd(q, k, v, block_indices):
        return msa_jax.block_sparse_attention(q, k, v, block_indices, **sparse)

    def sparse_loss(q, k, v, block_indices, w):
        return weighted_sum(sparse_fwd(q, k, v, block_indices), w)

    def msa(q, k, v, index_q, index_k):
        return msa_jax.sparse_attention(q, k, v, index_q, index_k, **msa_options)

    def msa_fwd(q, k, v, index_q, index_k):
        return msa(q, k, v, index_q, index_k).out

    def msa_loss(q, k, v, index_q, index_k, w, mode="sparse"):
        res = msa_jax.sparse_attention(q, k, v, index_q, index_k, mode=mode, **msa_options)
        return weighted_sum(res.out, w) + res.kl_loss

    def dense_fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def dense_loss(q, k, v, w):
        return weighted_sum(dense_fwd(q, k, v), w)

    return {
        "indexer": indexer,
        "sparse_fwd": sparse_fwd,
        "sparse_fwd_bwd": jax.value_and_grad(sparse_loss, argnums=(0, 1, 2)),
        "msa_fwd": msa_fwd,
        "msa_fwd_bwd_kl": jax.value_and_grad(msa_loss, argnums=(0, 1, 2, 3, 4)),
        "msa_dense_fwd_bwd_kl": jax.value_and_grad(functools.partial(msa_loss, mode="dense"), argnums=(0, 1, 2, 3, 4)),
        "dense_fwd": dense_fwd,
        "dense_fwd_bwd": jax.value_and_grad(dense_loss, argnums=(0, 1, 2)),
    }[op]


# ---------------------------------------------------------------------------- timing


def time_calls(fn, input_sets, *, warmup: int, repeats: int, time_limit: float):
    """(compile_s, times_s, calls_per_sample, time_limited) of fn, inputs taken in turn.

    The first call (compiling, unless fn is already compiled) gives compile_s; then up to
    `warmup` calls, each timed alone; then `repeats` samples. A sample issues calls_per_sample calls
    back to back and blocks on the last one; it is 1 unless a warm call took less than
    MIN_SAMPLE_S, so that for short calls the host's dispatch overlaps the device's work
    instead of adding to it. times_s holds each sample's time per call. Once the case has
    run for `time_limit` seconds no further call starts, but one sample always runs.
    """
    inputs = itertools.cycle(input_sets)
    start = time.perf_counter()
    jax.block_until_ready(fn(*next(inputs)))
    compile_s = call_s = time.perf_counter() - start
    warm = 0
    while warm < warmup and time.perf_counter() - start <= time_limit:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*next(inputs)))
        call_s = time.perf_counter() - t0
        warm += 1
    calls_per_sample = max(1, min(MAX_CALLS_PER_SAMPLE, int(MIN_SAMPLE_S / call_s)))
    times = []
    while len(times) < repeats and not (times and time.perf_counter() - start > time_limit):
        t0 = time.perf_counter()
        for _ in range(calls_per_sample):
            out = fn(*next(inputs))
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls_per_sample)
        del out
    return compile_s, times, calls_per_sample, warm < warmup or len(times) < repeats


def device_bytes(compiled) -> dict | None:
    """XLA's memory plan of one compiled case: arguments, outputs and temporaries (the peak a
    call needs beyond what the caller holds is about temp_bytes), or None if not reported."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (backends without the analysis)
        return None
    if ma is None:
        return None
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return {"argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
            "temp_bytes": ma.temp_size_in_bytes, "total_bytes": total}


def run_case(record: dict, base: dict, op: str, impl: str, settings: dict) -> None:
    """Times one case and fills `record` in place; never raises for a failing case."""
    cfg, n, batch, dtype = CONFIGS[record["config"]], record["n"], settings["batch"], settings["dtype"]
    names = OP_INPUTS[op]
    set_bytes = sum(base[name].nbytes for name in names)
    extra = []
    try:
        if set_bytes < ROTATE_BELOW:
            random_names = [name for name in names if name != "block_indices"]  # the selection stays fixed
            for seed in range(1, ROTATION_SETS):
                extra.append(make_inputs(cfg, n, batch, dtype, random_names, seed))
        input_sets = [[base[name] for name in names]]
        input_sets += [[arrays.get(name, base[name]) for name in names] for arrays in extra]
        record.update(input_sets=len(input_sets), input_bytes=set_bytes)
        t0 = time.perf_counter()
        fn = jax.jit(op_function(op, impl, cfg, settings["deterministic"])).lower(*input_sets[0]).compile()
        compile_s = time.perf_counter() - t0
        record.update(device_bytes=device_bytes(fn))
        _, times, calls_per_sample, limited = time_calls(
            fn, input_sets, warmup=settings["warmup"], repeats=settings["repeats"], time_limit=settings["time_limit_s"]
        )
        median = statistics.median(times)
        record.update(
            status="ok", compile_s=compile_s, times_s=times, calls_per_sample=calls_per_sample,
            median_s=median, time_limited=limited,
            tflops=None if record["flops"] is None else record["flops"] / median / 1e12,
        )
    except NotImplementedError as e:
        record.update(status="skipped", skip_kind="not_implemented", reason=str(e))
    # The harness must outlive any one case (out of memory, a kernel that fails to compile)
    # so that the rest of an expensive device run is still recorded.
    except Exception as e:  # noqa: BLE001
        message = f"{type(e).__name__}: {e}"
        oom = "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
        record.update(status="skipped", skip_kind="out_of_memory" if oom else "error", reason=message[:2000])
    finally:
        for arrays in extra:
            for array in arrays.values():
                array.delete()
        gc.collect()


# --------------------------------------------------------------------------- records


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the repository holding this file.

    Outside git (the lent GPU gets a copy of the working tree, not the repository) the
    commit comes from MSA_JAX_COMMIT, which the caller sets to the HEAD whose clean tree it
    sent (dirty False); without it, ("unknown", None).
    """
    if os.environ.get("MSA_JAX_COMMIT"):
        return os.environ["MSA_JAX_COMMIT"], False
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, bool(status.strip())


def default_out_path(device: str, date: datetime.datetime, folder: Path) -> Path:
    """folder/<device>-<YYYYMMDD-HHMMSS>.json, e.g. nvidia-h100-80gb-hbm3-20261122-043000.json."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    return folder / f"{slug}-{date.strftime('%Y%m%d-%H%M%S')}.json"


def write_json(path: Path, run: dict) -> None:
    """Replaces `path` atomically, so a run killed mid-write keeps the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    os.replace(tmp, path)


def new_case(config: str, n: int, impl: str, op: str, settings: dict, support: int | None) -> dict:
    cfg = CONFIGS[config]
    backward = op in BACKWARD_OPS
    return {
        "config": config, "n": n, "batch": settings["batch"], "impl": impl, "op": op,
        "baseline": op in BASELINE_OPS, "status": "running", "skip_kind": None, "reason": None,
        "compile_s": None, "times_s": [], "calls_per_sample": None, "median_s": None, "time_limited": False,
        "input_sets": None, "input_bytes": None, "device_bytes": None,
        "support_size_sum": support if op in ("sparse_fwd", "sparse_fwd_bwd", "msa_fwd", "msa_fwd_bwd_kl") else None,
        "flops": case_flops(op, cfg, n, settings["batch"], support), "tflops": None,
        "speedup_vs": "dense_fwd_bwd" if backward else "dense_fwd", "speedup": None,
    }


def fill_speedup(case: dict, baselines: dict[str, dict]) -> None:
    baseline = case if case["op"] == case["speedup_vs"] else baselines.get(case["speedup_vs"])
    if case["status"] == "ok" and baseline is not None and baseline["status"] == "ok":
        case["speedup"] = baseline["median_s"] / case["median_s"]


def print_table(cases: list[dict]) -> None:
    print(f"\n{'config':<7}{'N':>8} {'impl':<8}{'op':<16}{'ms':>10}{'TFLOP/s':>9}{'speed-up':>10}  note")
    for c in cases:
        if c["status"] == "ok":
            speedup = "-" if c["speedup"] is None else f"{c['speedup']:.2f}x"
            note = "time-limited" if c["time_limited"] else ""
            tflops = "-" if c["tflops"] is None else f"{c['tflops']:.3g}"
            print(f"{c['config']:<7}{c['n']:>8} {c['impl']:<8}{c['op']:<16}{c['median_s'] * 1e3:>10.3f}"
                  f"{tflops:>9}{speedup:>10}  {note}")
        else:
            reason = re.sub(r"^no implementation can serve \w+: ", "", (c["reason"] or "").replace("\n", " "))
            print(f"{c['config']:<7}{c['n']:>8} {c['impl']:<8}{c['op']:<16}{'-':>10}{'-':>9}{'-':>10}  "
                  f"{c['status']} ({c['skip_kind']}): {reason[:70]}")


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", nargs="+", default=list(KNOWN), choices=KNOWN,
                        help="msa_jax implementations to time (the ops' implementation= argument)")
    parser.add_argument("--ops", nargs="+", default=list(MSA_OPS), choices=MSA_OPS)
    parser.add_argument("--n", nargs="+", type=int, default=[8192, 32768, 131072], help="T = S, tokens")
    parser.add_argument("--config", nargs="+", default=["A", "B"], choices=sorted(CONFIGS))
    parser.add_argument("--baselines", nargs="*", default=list(BASELINE_OPS), choices=BASELINE_OPS,
                        help="dense cases timed per N (the speedups' denominators); fewer for N where "
                             "dense attention takes minutes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True to the MSA ops (bitwise-repeatable gradients)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per case (median reported; see calls_per_sample)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="seconds per case: no further call starts once a case has run this long, "
                             "and larger N of the same config, impl and op are skipped")
    parser.add_argument("--out", type=Path, help="JSON path, or an existing folder to write "
                        "<device>-<date>.json in (default: benchmarks/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.n) < 1:
        parser.error(f"--warmup must be >= 0 and every --n >= 1, got {args.warmup} and {args.n}")
    return args


def main(argv=None) -> dict:
    """Runs the benchmark; returns the run record it wrote."""
    args = parse_args(argv)
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    now = datetime.datetime.now(datetime.timezone.utc)
    if args.out is None or args.out.is_dir():
        out_path = default_out_path(device, now, args.out or RESULTS_DIR)
    else:
        out_path = args.out
    on_gpu = backend == "gpu"
    dense_impl = "cudnn" if on_gpu else "xla"
    commit, dirty = git_state()
    settings = {
        "batch": args.batch, "dtype": args.dtype, "deterministic": args.deterministic,
        "repeats": args.repeats, "warmup": args.warmup,
        "time_limit_s": args.time_limit, "rotate_below_bytes": ROTATE_BELOW, "rotation_sets": ROTATION_SETS,
        "min_sample_s": MIN_SAMPLE_S, "max_calls_per_sample": MAX_CALLS_PER_SAMPLE,
        "dense_impl": dense_impl,
        "dense_note": "jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')" if on_gpu else
        f"backend {backend}: cuDNN unavailable, the dense baseline is implementation='xla'",
        "block_indices_from": "msa_jax.select_blocks(implementation=None) on input set 0",
    }
    run = {
        "schema_version": SCHEMA_VERSION, "device": device, "backend": backend,
        "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
        "git_commit": commit, "git_dirty": dirty,
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv if argv is None else ["benchmarks/bench.py", *argv]),
        "settings": settings,
        "configs": {name: dataclasses.asdict(CONFIGS[name]) for name in args.config},
        "flop_conventions": FLOP_CONVENTIONS,
        "finished": False,
        "cases": [],
    }
    print(f"{device} ({backend}), jax {jax.__version__}, commit {commit[:12]}{' dirty' if dirty else ''}; "
          f"writing {out_path}", flush=True)
    dtype = jnp.dtype(args.dtype)
    over_limit = set()  # (config, impl, op) whose last case ran past --time-limit

    def record_case(case):
        run["cases"].append(case)
        write_json(out_path, run)
        status = f"{case['median_s'] * 1e3:.3f} ms" if case["status"] == "ok" else f"{case['status']} ({case['skip_kind']})"
        print(f"  {case['config']} N={case['n']} {case['impl']} {case['op']}: {status}", flush=True)

    def timed_case(config, n, impl, op, base, support, baselines):
        case = new_case(config, n, impl, op, settings, support)
        if (config, impl, op) in over_limit:
            case.update(status="skipped", skip_kind="time_limit",
                        reason=f"a smaller N exceeded --time-limit {args.time_limit:g} s")
        else:
            run_case(case, base, op, impl, settings)
            if case["time_limited"]:
                over_limit.add((config, impl, op))
        fill_speedup(case, baselines)
        record_case(case)
        return case

    for config in args.config:
        cfg = CONFIGS[config]
        for n in args.n:
            base = make_inputs(cfg, n, args.batch, dtype, input_shapes(cfg, n, args.batch), seed=0)
            baselines = {}
            for op in args.baselines:
                baselines[op] = timed_case(config, n, dense_impl, op, base, None, baselines)
            support, selection_error = None, None
            if set(args.ops) - {"indexer"}:
                try:
                    base["block_indices"] = fixed_selection(base, cfg)
                    support = support_size_sum(base["block_indices"], block_size=cfg.block_size, num_keys=n)
                except Exception as e:  # noqa: BLE001 (as in run_case: record it, go on)
                    selection_error = f"the fixed block_indices failed: {type(e).__name__}: {e}"[:2000]
            for impl in args.impl:
                for op in args.ops:
                    if selection_error and op != "indexer":
                        case = new_case(config, n, impl, op, settings, None)
                        case.update(status="skipped", skip_kind="error", reason=selection_error)
                        record_case(case)
                    else:
                        timed_case(config, n, impl, op, base, support, baselines)
            for array in base.values():
                array.delete()
            del base
            gc.collect()
            jax.clear_caches()

    run["finished"] = True
    write_json(out_path, run)
    print_table(run["cases"])
    print(f"\nwrote {out_path}")
    return run


if __name__ == "__main__":
    main()
