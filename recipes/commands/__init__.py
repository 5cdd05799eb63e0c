"""Subcommands of the ``argrpo`` CLI. Each module here registers one with :func:`command`.

Modules must import heavy libraries (torch, ray, ...) inside their ``run`` function so ``argrpo --help`` is fast.
"""

from __future__ import annotations

import argparse
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from argrpo.registry import Registry


@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None]
    configure: Callable[[argparse.ArgumentParser], None] | None = None


def _command_modules() -> list[str]:
    """Every module of this package: each registers its subcommand on import."""
    return [f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]


COMMANDS: Registry[Command] = Registry("argrpo command", builtins=_command_modules)


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args)`` as ``argrpo NAME``; a second registration of the same name is an error."""

    def deco(run):
        COMMANDS.add(name, Command(name, help, run, configure))
        return run

    return deco


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The common shape of every config-driven subcommand: CONFIG plus repeated ``--set key=value``."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (dotted path, value parsed as YAML); repeatable",
    )


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """``--ray-address``: run the rollout and reward actors on an existing (multi-node) Ray cluster."""
    parser.add_argument(
        "--ray-address", default=None, metavar="HOST:PORT",
        help="join this Ray cluster for rollout and reward actors (default: $RAY_ADDRESS; with neither, a local "
             "Ray is started when a config asks for actors)",
    )


def join_ray(address: str | None, command_name: str) -> str | None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``) before anything creates actors; returns the address
    used, or None when neither is set (nothing is started then). An address that does not answer ends the command
    with an error naming it."""
    import os

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        return None
    from argrpo.cluster import init_ray
    from argrpo.errors import UserError

    try:
        init_ray(address)
    except ConnectionError as e:
        raise UserError(f"cannot join the Ray cluster: {e}") from e
    return address
