"""The ``galaxalign-batch`` command line: one entry point, one module per subcommand.

Each module in this package defines ``register(subparsers)`` which adds its parser and sets
``func`` to a callable ``(args) -> int``. Heavy imports happen inside those callables so that
``--help`` stays fast. Options that several commands share are built in :mod:`._options` (one
spelling, default and help each; the vocabulary is in docs/cli.md).

Exit status: 0 done, 1 an error while working (one line on stderr), 2 a usage error (argparse's,
or :class:`~galaxalign_batch.cli._options.UsageError`), 3 some tiles failed (``embed``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from galaxalign_batch._version import __version__
from galaxalign_batch.cli._options import CommandParser, UsageError
from galaxalign_batch.errors import GalaxAlignError

# In the order of the data's path; `help` of the top-level parser lists them so.
SUBCOMMANDS = ["simulate", "info", "cutout", "pretrain", "train", "evaluate", "embed", "verify", "classify",
               "search",
               "join", "report", "demo", "fewshot", "label", "morphology", "restore", "detect"]

log = logging.getLogger("galaxalign_batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="galaxalign-batch",
        description="GalaxAlign tri-modal fine-tuning and survey-scale embedding of galaxy images.",
        epilog="Run 'galaxalign-batch COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (default: INFO)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars (also when stderr is not a TTY)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"galaxalign_batch.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.no_progress:
        from galaxalign_batch import progress
        progress.disable()
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:  # logged like every other error, but exit status 2 as argparse's own
        log.error("%s", e)
        return 2
    except GalaxAlignError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


