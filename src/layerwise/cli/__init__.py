"""The ``layerwise`` command: one module per subcommand (simulate, plan, train, generate,
diagnose, export); this package only assembles them and turns bad input into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from layerwise.cli import diagnose, export, generate, plan, simulate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Layer-wise model parallelism: split consecutive layers across workers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (simulate, plan, train, generate, diagnose, export):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"layerwise {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
