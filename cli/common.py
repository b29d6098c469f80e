"""What both console scripts do around a subcommand: logging, and refusals printed without a traceback."""

from __future__ import annotations

import argparse
import logging


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, quiet_level: int, refusals: tuple[type[Exception], ...]) -> None:
    """Parse `argv`, log at `quiet_level` (DEBUG with -v/--verbose) and run the chosen subcommand.

    `refusals` are errors about the user's input (a missing model directory, a malformed data file):
    they exit with `error: ...` instead of a traceback, which stays for everything else."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except refusals as e:
        raise SystemExit(f"error: {e}") from None
