"""JSON rows read in one place (prompt files, caption tables, metrics logs, GenEval metadata strings), with errors
that name the file and the 1-based row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from argrpo.errors import UserFileError


def parse_json(text: str | bytes, where: str, error: type[Exception] = UserFileError, obj: bool = True) -> Any:
    """One JSON value; ``obj=True`` requires an object (dict). Errors are ``error("<where>: ...")``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON: {e}") from e
    if obj and not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path, error: type[Exception] = UserFileError, obj: bool = True) -> list[tuple[int, Any]]:
    """``(row number, value)`` for every non-blank line of a JSON-lines file, rows numbered from 1 as an editor
    shows them; errors name the file and row (see :func:`parse_json`)."""
    path = Path(path)
    with open(path) as f:
        return [(n, parse_json(line, f"{path}: row {n}", error, obj)) for n, line in enumerate(f, start=1)
                if line.strip()]
