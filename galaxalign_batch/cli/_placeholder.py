"""Subcommands that later issues fill in: they exist so --help shows the whole tool, and say so."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("galaxalign_batch")


def placeholder(sub: argparse._SubParsersAction, name: str, help: str, issue: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=f"{help} [NOT IMPLEMENTED YET]",
                       description=f"{help}\n\nNOT IMPLEMENTED YET: this command is planned ({issue}).")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        log.error("'galaxalign-batch %s' is not implemented yet (%s).", name, issue)
        return 2

    p.set_defaults(func=run)
    return p
