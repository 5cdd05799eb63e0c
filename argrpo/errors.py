"""Errors that are the user's to fix (a config key, a name, a file, a row), as opposed to bugs.

The ``argrpo`` CLI prints a :class:`UserError` as one line, ``argrpo <command>: <message>``, and exits with status 2;
any other exception is a bug and keeps its traceback. Each subclass also derives from the built-in exception that
callers caught before (``ValueError``, ``KeyError``, ``FileNotFoundError``), so library code can still catch those.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message alone says what and where (file, key, row), so no traceback is needed."""


class UnknownNameError(UserError, KeyError, ValueError):
    """A name that no registry entry has; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UserFileError(UserError, ValueError):
    """A file the user named has bad content; the message names the file and the row or key."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what it should be (e.g. not a checkpoint)."""
