"""Plots speed-up over dense attention from bench.py's and bench_decode.py's JSON.

    python benchmarks/plot.py benchmarks/results/*.json -o benchmarks/results/speedup.png

Training and prefill (bench.py): one panel per (device, config), one line per (impl, op); x is
N on a log2 axis, y the speed-up over the same run's dense causal baseline (cuDNN on GPU) on a
log2 axis, so 2x faster and 2x slower sit equally far from the dashed line at 1. Colour tells
the op, line style the impl. Decode (bench_decode.py, GPU runs): one panel per (device,
config), a group of bars per (B, N) case, one bar per (impl, op, cache) of the decode step and
the index scan, y the speed-up over the same run's dense decode. Where several runs timed the
same case, the newest wins. Needs matplotlib (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; the device and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_table import latest_cases, latest_decode_cases, load_decode_runs, load_runs, n_label  # noqa: E402


OP_COLORS = {"indexer": "tab:blue", "sparse_fwd": "tab:orange", "sparse_fwd_bwd": "tab:red",
             "msa_fwd": "tab:green", "msa_fwd_bwd_kl": "tab:purple",
             "msa_dense_fwd_bwd_kl": "tab:brown", "decode_step": "tab:olive", "index_scan": "tab:cyan"}
IMPL_STYLES = {"pallas": "-", "cuda": "--", "xla": ":"}
DECODE_OPS = ("decode_step", "index_scan")  # the bars of a decode panel (the attention alone is not)


def speedup_lines(runs) -> dict[tuple[str, str], dict[tuple[str, str], list[tuple[int, float]]]]:
    """(device, config) -> (impl, op) -> sorted [(n, speed-up)] of msa_jax's successful cases."""
    panels = defaultdict(lambda: defaultdict(list))
    for (device, config, n, impl, op, baseline), (_, _, case) in latest_cases(runs).items():
        if not baseline and case["speedup"] is not None:
            panels[(device, config)][(impl, op)].append((n, case["speedup"]))
    return {panel: {line: sorted(points) for line, points in lines.items()} for panel, lines in panels.items()}


def decode_bars(decode_runs) -> dict[tuple[str, str], dict[tuple[int, int], dict[str, float]]]:
    """(device, config) -> (batch, n) -> {"impl op cache": speed-up} of the decode step and the
    index scan, from the GPU decode runs."""
    panels = defaultdict(lambda: defaultdict(dict))
    for (device, config, batch, n, impl, op, kv), (_, _, case) in latest_decode_cases(decode_runs).items():
        if op in DECODE_OPS and case.get("speedup_vs_dense") is not None:
            panels[(device, config)][(batch, n)][f"{impl} {op} {kv}"] = case["speedup_vs_dense"]
    return {panel: dict(cases) for panel, cases in panels.items()}


def _plot_decode(ax, device: str, config: str, cases) -> None:
    labels = sorted({label for bars in cases.values() for label in bars})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [x + (i - (len(labels) - 1) / 2) * width for x, case in enumerate(sorted(cases)) if label in cases[case]]
        ys = [cases[case][label] for case in sorted(cases) if label in cases[case]]
        impl, op, _ = label.split()
        bars = ax.bar(xs, ys, width, label=label, color=OP_COLORS.get(op, "tab:gray"), alpha=0.9 if impl == "cuda" else 0.5,
                      hatch="//" if label.endswith("fp8") else None, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.1fx", fontsize=6)
    ax.set_xticks(range(len(cases)), [f"B {b}, {n_label(n)}" for b, n in sorted(cases)])
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("speed-up over dense decode (cuDNN)")
    ax.set_title(f"decode step (T = 1): {device}, config {config}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6)


def plot(panels, out: Path, decode=None) -> None:
    decode = decode or {}
    keys = sorted(panels)
    n = len(keys) + len(decode)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, key in zip(axes[0][len(keys):], sorted(decode)):
        _plot_decode(ax, *key, decode[key])
    for ax, (device, config) in zip(axes[0], keys):
        lines = panels[(device, config)]
        for (impl, op), points in sorted(lines.items()):
            ns, speedups = zip(*points)
            ax.plot(ns, speedups, marker="o", color=OP_COLORS.get(op, "black"),
                    linestyle=IMPL_STYLES.get(impl, "-."), label=f"{impl} {op}")
        ns = sorted({n for points in lines.values() for n, _ in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [n_label(n) for n in ns])
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("context length N (T = S)")
        ax.set_ylabel("speed-up over dense causal attention")
        ax.set_title(f"{device}, config {config}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by bench.py or bench_decode.py")
    parser.add_argument("-o", "--out", type=Path, required=True, help="image path (.png)")
    args = parser.parse_args(argv)
    panels = speedup_lines(load_runs(args.results))
    decode = decode_bars(load_decode_runs(args.results))
    if not panels and not decode:
        print(f"no speed-ups to plot in {[str(p) for p in args.results]}")
        return 1
    plot(panels, args.out, decode)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
