"""Summarises Nsight Compute's source page (gpu_session.sh's ncu-source step: `ncu -i REPORT
--page source --csv --print-source sass`) of one kernel: where its warps wait.

    python benchmarks/ncu_stalls.py ncu-source-csv.log --top 30

Prints the stall reasons over the whole kernel, the instructions with the most warp-stall
samples (with their two largest reasons), and the waits on each mbarrier the kernel uses
(SYNCS.PHASECHK on the same shared-memory operand, the retry loops included), which in a
warp-specialised kernel tell whether the consumers wait for the producers or the other way.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str):
    """(header, rows) of the CSV's instruction table (the first line names the kernel)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    start = next(i for i, r in enumerate(lines) if r and r[0] == "Address")
    header = lines[start]
    return header, [r for r in lines[start + 1:] if len(r) == len(header)]


def summarise(header, rows, top: int) -> str:
    at = {name: i for i, name in enumerate(header)}
    reasons = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
    samples = [int(r[at[SAMPLES]]) for r in rows]
    total = sum(samples)
    out = [f"{total} warp-stall samples over {len(rows)} SASS instructions"]
    by_reason = {c: sum(int(r[at[c]]) for r in rows) for c in reasons}
    out.append("by reason: " + ", ".join(f"{c[6:]} {v / total:.1%}" for c, v in
                                         sorted(by_reason.items(), key=lambda kv: -kv[1]) if v))
    # A barrier wait is a TRYWAIT on [operand] followed by the predicated branch (or, in the
    # out-of-line retry loop, the NANOSLEEP) that holds its samples: the samples from the
    # TRYWAIT to the first branch after it (a few instructions) go to the operand.
    waits = collections.Counter()
    for i, r in enumerate(rows):
        m = re.search(r"SYNCS\.PHASECHK\S*\s+\S+,\s*(\[[^\]]+\])", r[1])
        if m:
            operand = re.sub(r"R\d+\+URZ\+|UR\d+\+", "", m.group(1))
            end = next((j for j in range(i + 1, min(i + 8, len(rows))) if "BRA" in rows[j][1]), i)
            waits[operand] += sum(samples[i:end + 1])
    if waits:
        out.append("mbarrier waits (samples from each wait to the branch after it):")
        out += [f"  {operand:>16s} {n:9d} {n / total:.1%}" for operand, n in waits.most_common()]
    out.append(f"top {top} instructions:")
    for i in sorted(range(len(rows)), key=lambda i: -samples[i])[:top]:
        r = rows[i]
        two = sorted(((int(r[at[c]]), c[6:]) for c in reasons), reverse=True)[:2]
        out.append(f"  {i:5d} {samples[i]:8d} {r[1].strip()[:64]:64s} " + ", ".join(f"{c} {n}" for n, c in two))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    print(summarise(*read(args.csv), args.top))


if __name__ == "__main__":
    main()
