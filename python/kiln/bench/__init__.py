"""`kiln bench`: every op (forward, forward+backward, a sweep of sizes) and model training steps,
kiln against torch eager and torch.compile in the same run; tables, JSON and plots."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_parser(sub) -> None:
    from .cases import names

    bench = sub.add_parser("bench", help="time kiln's ops and model steps against torch eager and torch.compile",
                           description="Time kiln's ops and model training steps against torch eager and "
                                       "torch.compile in one process, on the same inputs; print a ratio table and "
                                       "write bench.json, bench.md and plots to --out.")
    bench.add_argument("names", nargs="*", metavar="OP|MODEL",
                       help=f"what to time (default: everything): {', '.join(names())}")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    bench.add_argument("--quick", action="store_true", help="one small size per op (a minute or two on a CPU)")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and the PNG plots")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (compiling is slow)")
    bench.add_argument("--mode", choices=["forward", "forward+backward", "both"], default="both",
                       help="time the forward only, forward+backward, or both")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    from . import runner

    modes = runner.MODES if args.mode == "both" else (args.mode,)
    runner.main(args.names or None, args.device, args.quick, args.out, compile=not args.no_compile,
                progress=not args.no_progress, modes=modes, command="kiln " + shlex.join(sys.argv[1:]))
    return 0
