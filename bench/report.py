"""Ratio table from a pytest-benchmark JSON file: each baseline's median over kiln's.

    python bench/report.py bench/results/linear_act_cpu.json [--out bench/results/linear_act_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict

from common import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    data = json.load(open(args.json_file))
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        groups[bench["group"]][info["impl"]] = (bench["stats"]["median"], info)
    # every implementation but kiln's, in the order the benchmarks ran them
    baselines = list(dict.fromkeys(b["extra_info"]["impl"] for b in data["benchmarks"]
                                   if b["extra_info"]["impl"] != "kiln"))
    rows = []
    for group, impls in groups.items():
        kiln_median, info = impls["kiln"]
        if "flop" in info:
            rate = f"{info['flop'] / kiln_median / 1e9:.0f} GFLOP/s"
        elif "bytes" in info:
            rate = f"{info['bytes'] / kiln_median / 1e9:.1f} GB/s"
        else:
            rate = "-"
        row = [group, f"{kiln_median * 1e3:.1f}", rate]
        for impl in baselines:
            median = impls.get(impl, (None,))[0]
            row += ["-", "-"] if median is None else [f"{median * 1e3:.1f}", f"{median / kiln_median:.2f}"]
        rows.append(row)
    machine = data.get("machine_info", {})
    title = (f"{machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"{data.get('datetime', '')[:10]}, medians of pytest-benchmark rounds")
    header = ["case", "kiln ms", "kiln rate"]
    for impl in baselines:
        header += [f"{impl} ms", f"{impl}/kiln"]
    table = markdown_table(header, rows)
    text = f"{title}\n\n{table}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
