"""Subcommands of the ``argrpo`` CLI. Each module here registers one with :func:`command`.

Modules must import heavy libraries (torch, ray, ...) inside their ``run`` function so ``argrpo --help`` is fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None]
    configure: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args)`` as ``argrpo NAME``; a second registration of the same name is an error."""

    def deco(run):
        if name in COMMANDS:
            raise ValueError(f"argrpo command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, run, configure)
        return run

    return deco


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The common shape of every config-driven subcommand: CONFIG plus repeated ``--set key=value``."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (dotted path, value parsed as YAML); repeatable",
    )
