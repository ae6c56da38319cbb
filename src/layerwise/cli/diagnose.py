"""``layerwise diagnose``: explain where a finished run's time went, and what to change; for
an unfinished run, what it has done so far and how to finish it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``diagnose`` on the ``layerwise`` command."""
    d = sub.add_parser(
        "diagnose",
        help="explain where a finished run's time went (or what an unfinished one has done)",
    )
    d.add_argument("run_dir")
    d.add_argument(
        "other_run",
        nargs="?",
        help="a second finished run: put the two side by side and attribute the difference "
        "in time per token to its causes (bubble, imbalance, hand-off, cores, ...)",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report of the run in ``args.run_dir``; return the exit code."""
    from layerwise.job.diagnose import diagnose, render

    if args.other_run:
        from layerwise.job.compare import compare, render_comparison

        both = compare(Path(args.run_dir), Path(args.other_run))
        print(json.dumps(both) if args.json else render_comparison(both))
        return 0
    report = diagnose(Path(args.run_dir))
    print(json.dumps(report) if args.json else render(report))
    return 0
