"""Decode benchmark: one MSA decode step (T = 1) over paged caches against dense decode.

For each (batch B, context N) the caches hold N tokens per row in pages of block_size
tokens, scattered over the pool in a random order (as a serving pool would hold them). It
times, per implementation and cache dtype:
  decode_step    paged_sparse_attention: the index scan with fused top-k, then sparse
                 attention over the top_k selected pages (what a model's decode step calls)
  index_scan     paged_select_blocks alone
  sparse_decode  paged_block_sparse_attention alone, on the step's selection
and, once per (B, N), the dense baseline: `jax.nn.dot_product_attention` of the same query
over the same context stored contiguously (cuDNN on a GPU). It also reports how often the
selection from FP8 index keys differs from the bf16 one on these inputs (the selections of
the last 16 tokens of every row, for enough (query, group) rows to count).

    python benchmarks/bench_decode.py                       # config A: B 1 at 1M, B 32 at 128K
    python benchmarks/bench_decode.py --config tiny --cases 1:256 2:128 --impl xla pallas   # CPU smoke run

The run is one JSON file (results/decode-<device>-<date>.json, rewritten after every case;
its "decode_schema_version" keeps readme_table.py from reading it as a bench.py run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
import jaxlib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (time_calls, git_state, write_json, CONFIGS: one harness)

import msa_jax  # noqa: E402
from msa_jax.dispatch import KNOWN  # noqa: E402

DECODE_SCHEMA_VERSION = 1
OPS = ("decode_step", "index_scan", "sparse_decode")
KV_DTYPES = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}
DEFAULT_CASES = ("1:1048576", "32:131072")
SELECTION_QUERIES = 16  # queries per row whose FP8 and bf16 selections are compared


def parse_case(text: str) -> tuple[int, int]:
    try:
        batch, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BATCH:TOKENS (e.g. 32:131072), got {text!r}") from None
    if batch < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"BATCH and TOKENS must be >= 1, got {text!r}")
    return batch, n


def make_problem(cfg: bench.Config, batch: int, n: int, seed: int) -> dict:
    """Random bf16 contiguous K/V/index keys [B, N, ...], the same as pages [P, page, ...] in a
    random physical order, the page table, and one decode query per row."""
    # unsafe_rbg: random bits for benchmark inputs only; compiles in a third of threefry's time.
    return _problem(jax.random.key(seed, impl="unsafe_rbg"), cfg, batch, n)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _problem(key, cfg: bench.Config, batch: int, n: int) -> dict:
    page = cfg.block_size
    pages_per_row = -(-n // page)
    span = pages_per_row * page
    normal = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)  # noqa: E731
    Hq, Hkv, D, Di = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.index_head_dim
    k, v = normal(0, (batch, span, Hkv, D)), normal(1, (batch, span, Hkv, D))
    num_pages = batch * pages_per_row
    perm = jax.random.permutation(jax.random.fold_in(key, 3), num_pages).astype(jnp.int32)

    def to_pages(x):  # logical page j of row b goes to physical page perm[b * pages_per_row + j]
        logical = x.reshape(num_pages, page, *x.shape[2:])
        return jnp.zeros_like(logical).at[perm].set(logical)

    return {
        "q": normal(4, (batch, 1, Hq, D)), "index_q": normal(5, (batch, 1, Hkv, Di)),
        # The last SELECTION_QUERIES tokens' index queries: the FP8 disagreement is counted over them.
        "index_q_multi": normal(6, (batch, SELECTION_QUERIES, Hkv, Di)),
        "k": k[:, :n], "v": v[:, :n],  # the dense baseline's contiguous context
        "k_pages": to_pages(k), "v_pages": to_pages(v), "index_k_pages": to_pages(normal(2, (batch, span, Di))),
        "page_table": perm.reshape(batch, pages_per_row), "kv_length": jnp.full((batch,), n, jnp.int32),
    }


def quantized(problem: dict) -> dict:
    """The FP8 pages (and per-token scales) of a problem's bf16 pages."""
    out = {}
    for name, scale in (("k_pages", "k_scale"), ("v_pages", "v_scale"), ("index_k_pages", "index_k_scale")):
        out[name], out[scale] = jax.jit(msa_jax.quantize_fp8)(problem[name])
    return out


def op_function(op: str, impl: str, cfg: bench.Config):
    kw = dict(implementation=impl)
    if op == "decode_step":
        return lambda q, iq, kp, vp, ikp, ks, vs, iks, table, length: msa_jax.paged_sparse_attention(
            q, kp, vp, iq, ikp, page_table=table, kv_length=length, top_k=cfg.top_k, k_scale=ks, v_scale=vs,
            index_k_scale=iks, **kw).out
    if op == "index_scan":
        return lambda iq, ikp, iks, table, length: msa_jax.paged_select_blocks(
            iq, ikp, page_table=table, kv_length=length, top_k=cfg.top_k, index_k_scale=iks, **kw)
    return lambda q, kp, vp, ks, vs, bi, table, length: msa_jax.paged_block_sparse_attention(
        q, kp, vp, bi, page_table=table, kv_length=length, k_scale=ks, v_scale=vs, **kw)


def op_args(op: str, arrays: dict, block_indices) -> list:
    a = arrays
    if op == "decode_step":
        return [a["q"], a["index_q"], a["k_pages"], a["v_pages"], a["index_k_pages"], a.get("k_scale"),
                a.get("v_scale"), a.get("index_k_scale"), a["page_table"], a["kv_length"]]
    if op == "index_scan":
        return [a["index_q"], a["index_k_pages"], a.get("index_k_scale"), a["page_table"], a["kv_length"]]
    return [a["q"], a["k_pages"], a["v_pages"], a.get("k_scale"), a.get("v_scale"), block_indices,
            a["page_table"], a["kv_length"]]


def bytes_read(op: str, cfg: bench.Config, batch: int, n: int, kv_itemsize: int) -> int:
    """Bytes a step must read (the memory floor of decode): all index keys, and top_k pages
    of K and V per kv head; dense decode reads all of K and V. Scales: 4 bytes per token
    (and head) when FP8."""
    scale = 4 if kv_itemsize == 1 else 0
    index = batch * n * (cfg.index_head_dim * kv_itemsize + scale)
    pages = batch * cfg.num_kv_heads * cfg.top_k * cfg.block_size * 2 * (cfg.head_dim * kv_itemsize + scale)
    if op == "dense_decode":
        return batch * n * cfg.num_kv_heads * 2 * cfg.head_dim * 2
    return {"decode_step": index + pages, "index_scan": index, "sparse_decode": pages}[op]


def selection_disagreement(bf16_rows, fp8_rows) -> dict:
    """How often FP8 index keys select differently from bf16 ones, per (row, group)."""
    a, b = np.asarray(bf16_rows), np.asarray(fp8_rows)
    rows = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    sets = [(set(x.tolist()) - {-1}, set(y.tolist()) - {-1}) for x, y in zip(*rows)]
    return {
        "rows": len(sets),
        "rows_differing": float(np.mean([x != y for x, y in sets])),
        "blocks_differing": float(np.mean([len(x - y) / max(1, len(x)) for x, y in sets])),
    }


def time_case(record: dict, fn, args, settings: dict) -> None:
    """Times fn(*args) into `record`; never raises (a failing case is recorded)."""
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        record.update(compile_s=time.perf_counter() - t0, device_bytes=bench.device_bytes(compiled))
        _, times, per_sample, limited = bench.time_calls(
            compiled, [args], warmup=settings["warmup"], repeats=settings["repeats"], time_limit=settings["time_limit_s"]
        )
        median = statistics.median(times)
        record.update(status="ok", times_s=times, calls_per_sample=per_sample, median_s=median, time_limited=limited,
                      gb_per_s=record["bytes_read"] / median / 1e9)
    except NotImplementedError as e:
        record.update(status="skipped", skip_kind="not_implemented", reason=str(e))
    except Exception as e:  # noqa: BLE001 (out of memory, a kernel that fails to compile: keep the run going)
        message = f"{type(e).__name__}: {e}"
        oom = "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
        record.update(status="skipped", skip_kind="out_of_memory" if oom else "error", reason=message[:2000])
    finally:
        gc.collect()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="A", choices=sorted(bench.CONFIGS))
    p.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                   help="BATCH:TOKENS per case (default: 1:1048576 32:131072)")
    p.add_argument("--impl", nargs="+", default=["cuda", "pallas"], choices=KNOWN)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--kv-dtype", nargs="+", default=list(KV_DTYPES), choices=sorted(KV_DTYPES),
                   help="page formats to time (fp8: K/V and index keys E4M3 with per-token scales)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per case (see bench.time_calls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path or a folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    return args


def main(argv=None) -> dict:
    """Runs the benchmark; returns the run record it wrote."""
    args = parse_args(argv)
    cfg = bench.CONFIGS[args.config]
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
    now = datetime.datetime.now(datetime.timezone.utc)
    folder = args.out if args.out is not None and args.out.is_dir() else bench.RESULTS_DIR
    out_path = args.out if args.out is not None and not args.out.is_dir() else (
        bench.default_out_path("decode-" + device, now, folder))
    on_gpu = backend == "gpu"
    commit, dirty = bench.git_state()
    settings = {"repeats": args.repeats, "warmup": args.warmup, "time_limit_s": args.time_limit, "seed": args.seed,
                "queries_per_row": 1, "dtype": "bfloat16",
                "dense_impl": "cudnn" if on_gpu else "xla",
                "dense_note": "jax.nn.dot_product_attention(q [B,1,Hq,D], k, v [B,N,Hkv,D]) over the whole context "
                              "(the query is the last token: no mask)"}
    run = {"decode_schema_version": DECODE_SCHEMA_VERSION, "device": device, "backend": backend,
           "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__, "git_commit": commit,
           "git_dirty": dirty, "date": now.isoformat(timespec="seconds"),
           "command": shlex.join(sys.argv if argv is None else ["benchmarks/bench_decode.py", *argv]),
           "config": args.config, "config_shape": dataclasses.asdict(cfg), "settings": settings,
           "selection_fp8_vs_bf16": [], "cases": [], "finished": False}
    print(f"{device} ({backend}), jax {jax.__version__}, commit {commit[:12]}{' dirty' if dirty else ''}; "
          f"writing {out_path}", flush=True)

    def record(case: dict):
        run["cases"].append(case)
        bench.write_json(out_path, run)
        status = f"{case['median_s'] * 1e3:.3f} ms" if case["status"] == "ok" else f"{case['status']} ({case['skip_kind']})"
        print(f"  B={case['batch']} N={case['n']} {case['impl']} {case['op']} {case['kv_dtype']}: {status}", flush=True)

    for batch, n in args.cases:
        problem = make_problem(cfg, batch, n, args.seed)
        new = lambda op, impl, kv: {"batch": batch, "n": n, "impl": impl, "op": op, "kv_dtype": kv,  # noqa: E731
                                    "status": "running", "skip_kind": None, "reason": None, "median_s": None,
                                    "bytes_read": bytes_read(op, cfg, batch, n, 1 if kv == "fp8" else 2)}
        dense = new("dense_decode", settings["dense_impl"], "bf16")
        impl_arg = "cudnn" if on_gpu else None
        time_case(dense, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl_arg),
                  [problem["q"], problem["k"], problem["v"]], settings)
        record(dense)
        for name in ("k", "v"):  # the contiguous copy is only the baseline's
            problem.pop(name).delete()
        formats = {kv: problem if kv == "bf16" else {**problem, **quantized(problem)} for kv in args.kv_dtype}
        for impl in args.impl:
            rows, multi = {}, {}
            for kv, arrays in formats.items():
                select = jax.jit(op_function("index_scan", impl, cfg))
                try:  # the step's selection (for sparse_decode), and that of 16 queries per row
                    rows[kv] = select(*op_args("index_scan", arrays, None))
                    multi[kv] = select(*op_args("index_scan", {**arrays, "index_q": arrays["index_q_multi"]}, None))
                except NotImplementedError:
                    rows[kv] = multi[kv] = None
                for op in args.ops:
                    case = new(op, impl, kv)
                    if op == "sparse_decode" and rows[kv] is None:
                        case.update(status="skipped", skip_kind="not_implemented",
                                    reason=f"{impl} has no paged select_blocks to select with")
                    else:
                        time_case(case, op_function(op, impl, cfg), op_args(op, arrays, rows[kv]), settings)
                    if case["status"] == "ok":
                        dense_s = dense["median_s"]
                        case["speedup_vs_dense"] = None if dense_s is None else dense_s / case["median_s"]
                    record(case)
            if multi.get("bf16") is not None and multi.get("fp8") is not None:
                stats = {"batch": batch, "n": n, "impl": impl, "queries_per_row": SELECTION_QUERIES,
                         **selection_disagreement(multi["bf16"], multi["fp8"])}
                run["selection_fp8_vs_bf16"].append(stats)
                bench.write_json(out_path, run)
                print(f"  B={batch} N={n} {impl}: FP8 selection differs from bf16 in {stats['rows_differing']:.1%} of "
                      f"{stats['rows']} (query, group) selections, {stats['blocks_differing']:.1%} of the selected "
                      f"blocks", flush=True)
        del formats, problem
        gc.collect()

    run["finished"] = True
    bench.write_json(out_path, run)
    print(f"\n{'B':>4}{'N':>10} {'impl':<8}{'op':<15}{'kv':<6}{'ms':>10}{'GB/s':>9}{'vs dense':>10}")
    for c in run["cases"]:
        if c["status"] == "ok":
            speedup = c.get("speedup_vs_dense")
            print(f"{c['batch']:>4}{c['n']:>10} {c['impl']:<8}{c['op']:<15}{c['kv_dtype']:<6}{c['median_s'] * 1e3:>10.3f}"
                  f"{c['gb_per_s']:>9.1f}{'-' if speedup is None else f'{speedup:.2f}x':>10}")
        else:
            print(f"{c['batch']:>4}{c['n']:>10} {c['impl']:<8}{c['op']:<15}{c['kv_dtype']:<6}  {c['status']} "
                  f"({c['skip_kind']}): {(c['reason'] or '')[:80]}")
    return run


if __name__ == "__main__":
    main()
