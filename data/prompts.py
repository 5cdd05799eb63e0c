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

RELATIONS = ("left of", "right of", "above", "below")
# GenEval's six tags; the rules read the tag (counting uses a stricter confidence threshold), so a misspelt tag
# would silently change how a prompt is judged.
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class PromptFileError(UserFileError):
    """A prompt file or row that cannot be read (not JSON, no prompt, not GenEval's schema); names file and row."""


class MissingPromptFileError(PromptFileError, MissingFileError):
    """The prompt file does not exist."""


def validate_spec(spec, where: str = "spec") -> dict:
    """Check one GenEval spec; raise PromptFileError naming ``where`` and the offending key."""
    if not isinstance(spec, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(spec).__name__}")
    for key, tp in (("tag", str), ("prompt", str), ("include", list)):
        if key not in spec:
            raise PromptFileError(f"{where}: missing key {key!r}")
        if not isinstance(spec[key], tp):
            raise PromptFileError(f"{where}: {key!r} must be a {tp.__name__}, got {spec[key]!r}")
    if not spec["prompt"].strip():
        raise PromptFileError(f"{where}: 'prompt' is empty")
    if spec["tag"] not in GENEVAL_TAGS:
        raise PromptFileError(f"{where}: unknown tag {spec['tag']!r}; GenEval's tags: {list(GENEVAL_TAGS)}")
    if not spec["include"]:
        raise PromptFileError(f"{where}: 'include' is empty")
    for i, req in enumerate(spec["include"]):
        w = f"{where}: include[{i}]"
        if not isinstance(req, dict):
            raise PromptFileError(f"{w}: expected an object, got {req!r}")
        if not isinstance(req.get("class"), str):
            raise PromptFileError(f"{w}: missing or non-string 'class'")
        count = req.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise PromptFileError(f"{w}: 'count' must be a positive int, got {count!r}")
        if "color" in req and not isinstance(req["color"], str):
            raise PromptFileError(f"{w}: 'color' must be a string, got {req['color']!r}")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise PromptFileError(
                    f"{w}: 'position' must be [relation in {list(RELATIONS)}, index of an earlier include], "
                    f"got {pos!r}"
                )
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list):
        raise PromptFileError(f"{where}: 'exclude' must be a list, got {exclude!r}")
    for i, req in enumerate(exclude):
        if not isinstance(req, dict) or not isinstance(req.get("class"), str) or not isinstance(req.get("count"), int):
            raise PromptFileError(f"{where}: exclude[{i}] must be {{'class': str, 'count': int}}, got {req!r}")
    return spec


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
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: not valid JSON: {e}") from e
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
