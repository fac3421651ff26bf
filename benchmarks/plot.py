"""Plots speed-up over dense causal attention against context length from bench.py's JSON.

    python benchmarks/plot.py benchmarks/results/*.json -o benchmarks/results/speedup.png

One panel per (device, config), one line per (impl, op); x is N on a log2 axis, y the
speed-up over the same run's dense baseline (cuDNN on GPU) on a log2 axis, so 2x faster and
2x slower sit equally far from the dashed line at 1. Colour tells the op, line style the impl. Where several runs timed the same case,
the newest wins. Needs matplotlib (`pip install -e ".[bench]"`).
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
from readme_table import latest_cases, load_runs, n_label  # noqa: E402


OP_COLORS = {"indexer": "tab:blue", "sparse_fwd": "tab:orange", "sparse_fwd_bwd": "tab:red",
             "msa_fwd": "tab:green", "msa_fwd_bwd_kl": "tab:purple",
             "msa_dense_fwd_bwd_kl": "tab:brown"}
IMPL_STYLES = {"pallas": "-", "cuda": "--", "xla": ":"}


def speedup_lines(runs) -> dict[tuple[str, str], dict[tuple[str, str], list[tuple[int, float]]]]:
    """(device, config) -> (impl, op) -> sorted [(n, speed-up)] of msa_jax's successful cases."""
    panels = defaultdict(lambda: defaultdict(list))
    for (device, config, n, impl, op, baseline), (_, _, case) in latest_cases(runs).items():
        if not baseline and case["speedup"] is not None:
            panels[(device, config)][(impl, op)].append((n, case["speedup"]))
    return {panel: {line: sorted(points) for line, points in lines.items()} for panel, lines in panels.items()}


def plot(panels, out: Path) -> None:
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
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
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by bench.py")
    parser.add_argument("-o", "--out", type=Path, required=True, help="image path (.png)")
    args = parser.parse_args(argv)
    panels = speedup_lines(load_runs(args.results))
    if not panels:
        print(f"no speed-ups to plot in {[str(p) for p in args.results]}")
        return 1
    plot(panels, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
