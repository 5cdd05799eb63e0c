"""``argrpo``: one entry point, one subcommand per stage. Subcommands live in ``recipes/commands/``.

A user error (an :class:`argrpo.errors.UserError`: a bad config key, an unknown name, a missing checkpoint, a bad
prompt row) prints one line, ``argrpo <command>: <message>``, and exits with status 2; ``--debug`` or
``ARGRPO_DEBUG=1`` prints its traceback first. Any other exception is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from argrpo.errors import UserError
from argrpo.recipes.commands import COMMANDS

DEBUG_ENV = "ARGRPO_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="argrpo", description="Pretrain, SFT and GRPO for autoregressive text-to-image models."
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of a user error too (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.names():
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.configure:
            cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(message: str) -> str:
    """A message on one line (YAML and JSON parser messages span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except UserError as e:
        if debug_requested(args):
            traceback.print_exc(file=sys.stderr)
        print(f"argrpo {args.command}: {one_line(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
