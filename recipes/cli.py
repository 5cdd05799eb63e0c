"""``argrpo``: one entry point, one subcommand per stage. Subcommands live in ``recipes/commands/``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from argrpo.config import ConfigError
from argrpo.recipes import commands as _commands


def _load_commands() -> None:
    for mod in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_commands.__name__}.{mod.name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="argrpo", description="Pretrain, SFT and GRPO for autoregressive text-to-image models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(_commands.COMMANDS):
        cmd = _commands.COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.configure:
            cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except ConfigError as e:
        print(f"argrpo {args.command}: config error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
