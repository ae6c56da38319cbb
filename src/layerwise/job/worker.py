"""The internal entry where the launcher starts each worker of a job.

    python -m layerwise.job.worker train RUN_DIR [--resume [required|if-any]]
    python -m layerwise.job.worker generate RUN_DIR --prompt ... --tokens ...

Everything a training worker needs is in ``RUN_DIR/config.json``, which the ``layerwise
train`` command wrote before starting the workers: one source of truth for every rank.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from layerwise.cli.generate import add_sampling_flags

    parser = argparse.ArgumentParser(prog="python -m layerwise.job.worker")
    sub = parser.add_subparsers(dest="job", required=True)
    t = sub.add_parser("train")
    t.add_argument("run_dir")
    t.add_argument(
        "--resume",
        nargs="?",
        const="required",
        choices=("required", "if-any"),
        help="continue from the newest whole checkpoint ('if-any': start at 0 without one)",
    )
    add_sampling_flags(sub.add_parser("generate"))
    args = parser.parse_args(argv)
    from layerwise.job.supervisor import follow_parent, quiet_interrupts

    follow_parent()
    quiet_interrupts()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where is this worker stuck?
    if args.job == "train":
        from layerwise.job.config import load_config
        from layerwise.job.train import train_worker

        cfg = load_config(args.run_dir)
        cfg.run_dir = args.run_dir
        return train_worker(cfg, resume=args.resume or False)
    from layerwise.job.sampling import sampling_worker

    return sampling_worker(args)


if __name__ == "__main__":
    sys.exit(main())
