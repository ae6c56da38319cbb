"""Shared inputs for the planner tests."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerwise.cli.plan import add_parser

DATA = Path(__file__).parent / "data"
NARAYANAN = DATA / "published_runs.csv"
KORTHIKANTI = DATA / "activation_memory.csv"
OTHER_RUNS = DATA / "other_published_runs.csv"


def parse(argv: list[str]) -> argparse.Namespace:
    """Returns the namespace ``layerwise plan ...`` would get."""
    parser = argparse.ArgumentParser(prog="layerwise")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return parser.parse_args(["plan", *argv])
