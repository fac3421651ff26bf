"""benchmarks/bench_decode.py on CPU at a tiny size: the record it writes, the problem it
builds (pages hold the contiguous context through the page table), and that what it times
is the right function (with top_k x block >= N the decode step is dense decode)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench_decode = _load("bench_decode")
readme_table = _load("readme_table")


def test_problem_pages_hold_the_context():
    cfg = bench_decode.bench.CONFIGS["tiny"]
    p = bench_decode.make_problem(cfg, 2, 64, seed=0)
    table = np.asarray(p["page_table"])
    assert sorted(table.ravel().tolist()) == list(range(8)) and not np.array_equal(table.ravel(), np.arange(8))
    k = np.asarray(p["k_pages"], np.float32)[table].reshape(2, 64, cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(k, np.asarray(p["k"], np.float32))
    # top_k x block_size = 64 = N: every block is selected, so the step is dense decode.
    step = jax.jit(lambda p: msa_jax.paged_sparse_attention(
        p["q"], p["k_pages"], p["v_pages"], p["index_q"], p["index_k_pages"], page_table=p["page_table"],
        kv_length=p["kv_length"], top_k=cfg.top_k))(p)
    dense = jax.nn.dot_product_attention(p["q"], p["k"], p["v"])
    np.testing.assert_allclose(np.asarray(step.out, np.float32), np.asarray(dense, np.float32), rtol=2e-2, atol=2e-2)


def test_bench_decode_record(tmp_path):
    out = tmp_path / "decode.json"
    run = bench_decode.main(["--config", "tiny", "--cases", "2:64", "--impl", "cuda", "xla",
                             "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == run and run["finished"]
    assert readme_table.load_runs([out]) == []  # not a bench.py run: the README table ignores it
    cases = {(c["batch"], c["n"], c["impl"], c["op"], c["kv_dtype"]): c for c in run["cases"]}
    assert len(cases) == 1 + 2 * 3 * 2  # dense, then 2 impls x 3 ops x 2 formats
    for (batch, n, impl, op, kv), c in cases.items():
        if impl == "cuda":
            assert c["status"] == "skipped" and c["skip_kind"] == "not_implemented", c
            continue
        assert c["status"] == "ok" and c["median_s"] > 0, c
        if op != "dense_decode":
            assert c["speedup_vs_dense"] > 0
    cfg = bench_decode.bench.CONFIGS["tiny"]
    # decode_step reads every index key and top_k pages of K and V per kv head (bf16: 2 bytes).
    want = 2 * 64 * cfg.index_head_dim * 2 + 2 * cfg.num_kv_heads * cfg.top_k * cfg.block_size * 2 * cfg.head_dim * 2
    assert cases[(2, 64, "xla", "decode_step", "bf16")]["bytes_read"] == want
    stats = run["selection_fp8_vs_bf16"]
    assert [(s["batch"], s["n"], s["impl"]) for s in stats] == [(2, 64, "xla")]
    for s in stats:
        assert s["rows"] == s["batch"] * 16 * cfg.num_kv_heads and 0 <= s["blocks_differing"] <= s["rows_differing"] <= 1


def test_selection_disagreement_counts_sets():
    a = jnp.asarray([[[3, 1, 2, 5]], [[0, 1, 2, -1]]], jnp.int32)
    b = jnp.asarray([[[1, 3, 2, 5]], [[0, 4, 2, -1]]], jnp.int32)
    stats = bench_decode.selection_disagreement(a, b)
    assert stats == {"rows": 2, "rows_differing": 0.5, "blocks_differing": 0.5 * (1 / 3)}


def test_decode_table_rows_from_a_gpu_run(tmp_path):
    """readme_table's decode table: GPU runs only, one row per (B, N, impl, op, cache), with the
    record's time, bandwidth and speed-up, and the run named among the sources."""
    out = tmp_path / "decode.json"
    run = bench_decode.main(["--config", "tiny", "--cases", "2:64", "--impl", "xla", "--repeats", "2",
                             "--warmup", "0", "--out", str(out)])
    assert "no GPU decode results" in readme_table.render_decode(readme_table.load_decode_runs([out]))
    gpu = tmp_path / "decode-gpu.json"
    gpu.write_text(json.dumps(dict(run, backend="gpu", device="NVIDIA H100 80GB HBM3")))
    text = readme_table.render_decode(readme_table.load_decode_runs([out, gpu]))
    step = next(c for c in run["cases"] if c["op"] == "decode_step" and c["kv_dtype"] == "fp8")
    assert (f"| NVIDIA H100 80GB HBM3 | tiny | 2 | 64 | xla | decode_step | fp8 | {step['median_s'] * 1e3:.3f} "
            f"| {step['gb_per_s']:.0f} | {step['speedup_vs_dense']:.2f}x |") in text
    assert text.count("| NVIDIA H100 80GB HBM3 |") == 1 + 3 * 2 and "`decode-gpu.json`" in text


def test_plot_has_a_decode_panel(tmp_path):
    """plot.py's decode bars: the GPU runs' decode step and index scan per (B, N), each bar the
    record's speed-up over dense decode; a CPU run alone gives nothing to plot."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')")
    plot = _load("plot")
    out = tmp_path / "decode.json"
    run = bench_decode.main(["--config", "tiny", "--cases", "2:64", "--impl", "xla", "--repeats", "2",
                             "--warmup", "0", "--out", str(out)])
    assert plot.main([str(out), "-o", str(tmp_path / "none.png")]) == 1
    gpu = tmp_path / "decode-gpu.json"
    gpu.write_text(json.dumps(dict(run, backend="gpu", device="GPU X")))
    bars = plot.decode_bars(readme_table.load_decode_runs([out, gpu]))
    want = {f"xla {c['op']} {c['kv_dtype']}": c["speedup_vs_dense"] for c in run["cases"]
            if c["op"] in ("decode_step", "index_scan")}
    assert bars == {("GPU X", "tiny"): {(2, 64): want}} and len(want) == 4
    png = tmp_path / "speedup.png"
    assert plot.main([str(gpu), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
