"""benchmarks/: bench.py's JSON record and FLOP counts, the README table, the plot (CPU).

bench.py runs once, on the tiny config, through its main(); the support-size FLOP count is
checked against a brute-force loop over every (query, group, key).
"""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

import jax.numpy as jnp

import msa_jax

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
N = 256
OPS = ("indexer", "sparse_fwd", "msa_fwd_bwd_kl", "msa_dense_fwd_bwd_kl")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
readme_table = _load("readme_table")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    argv = ["--config", "tiny", "--n", str(N), "--impl", "xla", "--ops", *OPS,
            "--repeats", "2", "--warmup", "1", "--out", str(out)]
    run = bench.main(argv)
    return run, out


def brute_force_support(block_indices, *, block_size, num_keys):
    """Keys visible to each (b, query, group) inside its selected blocks, summed; one by one."""
    B, T, Hkv, _ = block_indices.shape
    total = 0
    for b in range(B):
        for i in range(T):
            p = num_keys - T + i  # queries are the causal suffix of the keys
            for g in range(Hkv):
                chosen = set(block_indices[b, i, g].tolist())
                total += sum(1 for t in range(num_keys) if t <= p and t // block_size in chosen)
    return total


def _case(run, impl, op):
    [case] = [c for c in run["cases"] if c["impl"] == impl and c["op"] == op]
    return case


def test_bench_record_schema(bench_run):
    run, out = bench_run
    assert json.loads(out.read_text()) == run
    assert run["schema_version"] == bench.SCHEMA_VERSION
    for key in ("device", "backend", "jax_version", "jaxlib_version", "git_commit", "date", "command"):
        assert isinstance(run[key], str) and run[key], key
    assert run["git_dirty"] in (True, False, None)
    assert run["backend"] == "cpu" and run["settings"]["dense_impl"] == "xla"
    assert "cuDNN unavailable" in run["settings"]["dense_note"]
    assert "--config tiny" in run["command"] and run["finished"] is True
    assert run["configs"] == {"tiny": {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                                       "index_head_dim": 16, "block_size": 16, "top_k": 4}}
    assert [(c["impl"], c["op"]) for c in run["cases"]] == (
        [("xla", "dense_fwd"), ("xla", "dense_fwd_bwd")] + [("xla", op) for op in OPS])
    for case in run["cases"]:
        assert case["status"] == "ok" and case["skip_kind"] is None, case
        assert case["config"] == "tiny" and case["n"] == N and case["batch"] == 1
        assert len(case["times_s"]) == 2 and all(t > 0 for t in case["times_s"])
        assert 1 <= case["calls_per_sample"] <= bench.MAX_CALLS_PER_SAMPLE
        assert case["median_s"] == statistics.median(case["times_s"])
        assert case["tflops"] == pytest.approx(case["flops"] / case["median_s"] / 1e12)
        assert case["input_sets"] == 3  # tiny inputs are far below 4x L2: rotated
        baseline = _case(run, "xla", case["speedup_vs"])
        assert case["speedup"] == pytest.approx(baseline["median_s"] / case["median_s"])
        assert case["baseline"] == (case["op"] in ("dense_fwd", "dense_fwd_bwd"))
    assert _case(run, "xla", "msa_fwd_bwd_kl")["speedup_vs"] == "dense_fwd_bwd"
    assert _case(run, "xla", "indexer")["speedup_vs"] == "dense_fwd"


def test_dense_and_indexer_flops(bench_run):
    run, _ = bench_run
    Hq, Hkv, D, Di = 4, 2, 16, 16
    assert _case(run, "xla", "dense_fwd")["flops"] == 2 * Hq * D * N**2
    assert _case(run, "xla", "dense_fwd_bwd")["flops"] == 2.5 * 2 * Hq * D * N**2
    assert _case(run, "xla", "indexer")["flops"] == Hkv * Di * N**2
    dense_mode = _case(run, "xla", "msa_dense_fwd_bwd_kl")
    assert dense_mode["flops"] == Hkv * Di * N**2 + 2.5 * 2 * Hq * D * N**2
    assert dense_mode["speedup_vs"] == "dense_fwd_bwd" and dense_mode["support_size_sum"] is None


def test_sparse_flops_match_brute_force_support(bench_run):
    run, _ = bench_run
    cfg = bench.CONFIGS["tiny"]
    # The same index inputs bench.py drew (set 0), selected by the reference as bench.py does.
    inputs = bench.make_inputs(cfg, N, 1, jnp.bfloat16, ("index_q", "index_k"), seed=0)
    block_indices = msa_jax.select_blocks(inputs["index_q"], inputs["index_k"], top_k=cfg.top_k,
                                          block_size=cfg.block_size, implementation="xla")
    support = brute_force_support(np.asarray(block_indices), block_size=cfg.block_size, num_keys=N)
    sparse_fwd = 4 * cfg.group_size * cfg.head_dim * support
    assert _case(run, "xla", "sparse_fwd")["support_size_sum"] == support
    assert _case(run, "xla", "sparse_fwd")["flops"] == sparse_fwd
    indexer = cfg.num_kv_heads * cfg.index_head_dim * N**2
    assert _case(run, "xla", "msa_fwd_bwd_kl")["flops"] == indexer + 2.5 * sparse_fwd


def test_time_limit_and_not_implemented_are_recorded(tmp_path):
    out = tmp_path / "run.json"
    run = bench.main(["--config", "tiny", "--n", "64", "128", "--impl", "xla", "cuda", "--ops", "indexer",
                      "--repeats", "3", "--warmup", "1", "--time-limit", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == run
    cases = {(c["n"], c["impl"], c["op"]): c for c in run["cases"]}
    assert len(cases) == len(run["cases"]) == 2 * 4
    first = cases[(64, "xla", "indexer")]
    # Past the limit from the start: no warm-up, one timed call, and N = 128 is not tried.
    assert first["status"] == "ok" and first["time_limited"] and len(first["times_s"]) == 1
    for op in ("dense_fwd", "dense_fwd_bwd", "indexer"):
        later = cases[(128, "xla", op)]
        assert (later["status"], later["skip_kind"], later["speedup"]) == ("skipped", "time_limit", None), later
    for n in (64, 128):
        cuda = cases[(n, "cuda", "indexer")]
        assert (cuda["status"], cuda["skip_kind"]) == ("skipped", "not_implemented")
        assert "cuda" in cuda["reason"] and cuda["median_s"] is None


@pytest.mark.parametrize("q_len, num_keys", [(70, 70), (30, 70)])
def test_support_size_of_irregular_rows(rng, q_len, num_keys):
    """Rows with -1, ids past the last block, blocks after the local one, a partial last block."""
    block_size, top_k = 16, 5
    num_blocks = -(-num_keys // block_size)
    candidates = np.arange(-3, num_blocks + 3)
    rows = [rng.choice(candidates, top_k, replace=False) for _ in range(2 * q_len * 3)]
    block_indices = np.stack(rows).reshape(2, q_len, 3, top_k).astype(np.int32)
    want = brute_force_support(block_indices, block_size=block_size, num_keys=num_keys)
    assert want > 0
    assert bench.support_size_sum(jnp.asarray(block_indices), block_size=block_size, num_keys=num_keys) == want


def test_readme_table_in_sync_with_results():
    assert readme_table.main(["--check"]) == 0


def test_readme_table_from_gpu_run(bench_run, tmp_path):
    run, _ = bench_run
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.json").write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    decode = f"{readme_table.DECODE_START}\n{readme_table.DECODE_END}\n"
    readme.write_text(f"# x\n\n## Performance\n\n{readme_table.START}\nold\n{readme_table.END}\n\n{decode}\n## Tests\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert readme_table.main(args + ["--check"]) == 1
    assert readme_table.main(args) == 0
    assert "| no GPU results recorded yet |" in readme.read_text()
    assert readme_table.main(args + ["--check"]) == 0

    gpu = dict(run, backend="gpu", device="NVIDIA H100 80GB HBM3")
    (results / "gpu.json").write_text(json.dumps(gpu))
    assert readme_table.main(args + ["--check"]) == 1
    assert readme_table.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n") and text.endswith(f"{readme_table.DECODE_END}\n\n## Tests\n")
    assert "| no GPU decode results recorded yet |" in text
    sparse = _case(run, "xla", "sparse_fwd")
    row = (f"| NVIDIA H100 80GB HBM3 | tiny | {N} | xla | sparse_fwd | {sparse['median_s'] * 1e3:.2f} "
           f"| {sparse['tflops']:.3g} | {sparse['speedup']:.2f}x |")
    assert row in text.splitlines()
    assert "no GPU results" not in text
    assert sum(line.startswith("| NVIDIA H100") for line in text.splitlines()) == len(run["cases"])

    # A newer run whose sparse_fwd case is marked stale: that row keeps the older run's time,
    # every other row takes the newer one's.
    newer = json.loads(json.dumps(gpu))
    newer["date"] = "2099-01-01T00:00:00+00:00"
    for case in newer["cases"]:
        case["median_s"] *= 2
        if case["impl"] == "xla" and case["op"] == "sparse_fwd":
            case["stale"] = "the change it measured was reverted"
    (results / "newer.json").write_text(json.dumps(newer))
    assert readme_table.main(args) == 0
    lines = readme.read_text().splitlines()
    assert row in lines
    dense = _case(run, newer["cases"][0]["impl"], newer["cases"][0]["op"])
    assert not any(f"| {dense['median_s'] * 1e3:.2f} |" in line and f"| {dense['op']} |" in line for line in lines)


def test_plot_writes_png(bench_run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')")
    plot = _load("plot")
    _, out = bench_run
    png = tmp_path / "speedup.png"
    assert plot.main([str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_parallel_bench(tmp_path):
    """bench_cp.py (issue #16's measurement): each op split over 4 host devices and on one,
    per-device memory from XLA's plan (a quarter of the inputs per device), failures recorded."""
    import jax

    if jax.device_count() < 4:
        pytest.skip(f"needs 4 devices, found {jax.device_count()} (conftest sets 4 host devices)")
    bench_cp = _load("bench_cp")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), (bench_cp.AXIS,))
    for x in bench_cp.make_inputs(bench.CONFIGS["tiny"], 256, jnp.float32, mesh):  # created split
        assert x.sharding.spec[1] == bench_cp.AXIS and len(x.sharding.device_set) == 4, x.sharding
    out = tmp_path / "cp.json"
    run = bench_cp.main(["--config", "tiny", "--n", "256", "--devices", "4", "--impl", "xla", "cuda", "--single",
                         "--kv-fetch-blocks", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == run and run["finished"] and run["device_count"] == 4
    fetched = [c for c in run["cases"] if c["kv_fetch_blocks"] is not None]
    assert {(c["devices"], c["impl"], c["op"], c["kv_fetch_blocks"]) for c in fetched} == {
        (4, i, op, 2) for i in ("xla", "cuda") for op in bench_cp.OPS}
    for op in bench_cp.OPS:  # the split op fetching selected blocks runs too
        case = next(c for c in fetched if c["impl"] == "xla" and c["op"] == op)
        assert case["status"] == "ok" and case["median_s"] > 0, case
    cases = {(c["devices"], c["impl"], c["op"]): c for c in run["cases"] if c["kv_fetch_blocks"] is None}
    assert set(cases) == {(d, i, op) for d in (4, 1) for i in ("xla", "cuda") for op in bench_cp.OPS}
    for op in bench_cp.OPS:
        split, whole = cases[(4, "xla", op)], cases[(1, "xla", op)]
        assert split["status"] == whole["status"] == "ok", (split, whole)
        assert split["median_s"] > 0 and split["n"] == 256
        assert 4 * split["memory"]["argument_bytes"] == whole["memory"]["argument_bytes"]
        for d in (4, 1):  # no CUDA kernels on CPU: recorded, not raised
            cuda = cases[(d, "cuda", op)]
            assert cuda["status"] == "error" and "NotImplementedError" in cuda["error"]


def test_ncu_stalls_places_barrier_waits(tmp_path):
    """ncu_stalls.py on a hand-written source page: totals, and each mbarrier's waits summed
    from its TRYWAIT to the branch after it (the retry loop's NANOSLEEP included)."""
    ncu_stalls = _load("ncu_stalls")
    header = ["Address", "Source", ncu_stalls.SAMPLES, "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [
        ("0x0", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5+0x100], R3", 2, 0, 2),
        ("0x10", "IMAD.SHL.U32 R2, R2, 0x80, RZ", 3, 0, 3),
        ("0x20", "@!P0  BRA 0x90", 40, 40, 0),
        ("0x30", "FFMA R1, R2, R3, R4", 5, 0, 5),
        ("0x40", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R7+URZ+0x120], R3", 0, 0, 0),
        ("0x50", "@!P1  NANOSLEEP.SYNCS 0x989680", 30, 30, 0),
        ("0x60", "@!P1  BRA 0x40", 1, 1, 0),
    ]
    path = tmp_path / "source.csv"
    with open(path, "w") as f:
        f.write('"Kernel Name","kl_grad_kernel",\n')
        f.write(",".join(f'"{h}"' for h in header) + "\n")
        for r in rows:
            f.write(",".join(f'"{v}"' for v in (*r, 0)) + "\n")
    text = ncu_stalls.summarise(*ncu_stalls.read(str(path)), top=2)
    assert text.startswith("81 warp-stall samples over 7 SASS instructions")
    assert "long_sb 87.7%, wait 12.3%" in text
    assert "[0x100]        45 55.6%" in text  # 2 + 3 + 40
    assert "[0x120]        31 38.3%" in text  # 0 + 30 + 1
    top = text.split("top 2 instructions:\n")[1].splitlines()
    assert [line.split()[0] for line in top] == ["2", "5"]
