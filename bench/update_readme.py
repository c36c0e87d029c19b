"""Regenerate the README's "Benchmarks" table from a `kiln bench` run's bench.json.

    kiln bench --out bench/results/kiln_bench_cpu
    python bench/update_readme.py bench/results/kiln_bench_cpu/bench.json

The table replaces what lies between the README's `<!-- kiln bench: begin -->` and
`<!-- kiln bench: end -->` lines, with the command that produced it above it.
"""

import argparse
import json
import sys
from pathlib import Path

from kiln.bench.runner import summary

BEGIN, END = "<!-- kiln bench: begin -->", "<!-- kiln bench: end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path, help="bench.json written by kiln bench --out DIR")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md",
                        help="the README to update (default: the repository's)")
    parser.add_argument("--command", default=None,
                        help="the kiln bench command line to show (default: read from bench.json)")
    args = parser.parse_args()
    result = json.loads(args.bench_json.read_text())
    command = args.command or result.get("command", "kiln bench")
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.readme}: no {BEGIN} ... {END} section to replace", file=sys.stderr)
        return 2
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    body = f"\n`{command}` (results in `{args.bench_json.parent}`):\n\n{summary(result)}"
    args.readme.write_text(before + BEGIN + body + END + after)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
