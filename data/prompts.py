"""Prompt files, read in one place: GenEval jsonl (one JSON object a line, ``{"tag", "include", "exclude"?,
"prompt"}``), any jsonl of objects with a ``prompt``, or plain text (one prompt a line).

Reading validates every row (GenEval rows against GenEval's schema) and names the file and 1-based row of the first
problem; writing is atomic (temp file + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from argrpo.errors import MissingFileError, UserFileError
from argrpo.jsonl import parse_json
from argrpo.rewards.geneval import TAGS, parse_spec


class PromptFileError(UserFileError):
    """A prompt file or row that cannot be read (not JSON, no prompt, not GenEval's schema); names file and row."""


class MissingPromptFileError(PromptFileError, MissingFileError):
    """The prompt file does not exist."""


def validate_spec(spec, where: str = "spec") -> dict:
    """Check one GenEval row: a known ``tag`` (a misspelt one would silently change how the prompt is judged), a
    non-empty ``prompt``, and GenEval's clause schema (:func:`argrpo.rewards.geneval.parse_spec`, the rules' own
    check); raise PromptFileError naming ``where`` and the offending key."""
    if not isinstance(spec, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(spec).__name__}")
    for key, tp in (("tag", str), ("prompt", str), ("include", list)):
        if key not in spec:
            raise PromptFileError(f"{where}: missing key {key!r}")
        if not isinstance(spec[key], tp):
            raise PromptFileError(f"{where}: {key!r} must be a {tp.__name__}, got {spec[key]!r}")
    if not spec["prompt"].strip():
        raise PromptFileError(f"{where}: 'prompt' is empty")
    if spec["tag"] not in TAGS:
        raise PromptFileError(f"{where}: unknown tag {spec['tag']!r}; GenEval's tags: {list(TAGS)}")
    try:
        return parse_spec(spec, where)
    except ValueError as e:
        raise PromptFileError(str(e)) from None


def read_prompts(path: str | Path, geneval: bool = False) -> list[dict]:
    """A prompt file -> its rows, each a dict with a non-empty string ``prompt``; blank lines are skipped.

    ``*.jsonl`` (and any other file but ``*.txt`` whose first line starts with ``{``): one JSON object a line, kept
    whole (the other keys are the row's metadata); a row with GenEval keys (``tag``, ``include``) is checked against
    GenEval's schema, and with ``geneval=True`` every row must be a GenEval row. Otherwise one prompt a line.
    Errors name the file and the 1-based row: :class:`MissingPromptFileError` (a ``FileNotFoundError``) when the
    file is absent, :class:`PromptFileError` (a ``ValueError``) for its content.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPromptFileError(f"{path}: prompt file not found")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    if not lines:
        raise PromptFileError(f"{path}: no prompts")
    if path.suffix == ".txt" or (path.suffix != ".jsonl" and not lines[0][1].startswith("{")):
        if geneval:
            raise PromptFileError(f"{path}: expected GenEval jsonl (one JSON object a line), got plain text")
        return [{"prompt": text} for _, text in lines]
    return [_read_row(text, f"{path}: row {n}", geneval) for n, text in lines]


def _read_row(text: str, where: str, geneval: bool) -> dict:
    row = parse_json(text, where, PromptFileError, obj=False)
    if geneval or (isinstance(row, dict) and ("tag" in row or "include" in row)):
        return validate_spec(row, where)
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise PromptFileError(f"{where}: expected an object with a string 'prompt' (non-empty)")
    return row


def write_prompts(path: str | Path, specs: list[dict]) -> Path:
    """Validate and write specs as GenEval jsonl, atomically."""
    path = Path(path)
    for i, spec in enumerate(specs):
        validate_spec(spec, where=f"{path}: row {i + 1}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for spec in specs:
                f.write(json.dumps(spec) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
