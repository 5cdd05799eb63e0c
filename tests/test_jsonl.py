"""argrpo.jsonl: rows numbered as an editor shows them (blank lines count), errors name file and row."""

from __future__ import annotations

import pytest
from argrpo.errors import UserError, UserFileError
from argrpo.jsonl import parse_json, read_jsonl


def test_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2})]


def test_errors_name_file_and_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserFileError, match=rf"{path}: row 2: expected a JSON object, got list"):
        read_jsonl(path)
    assert read_jsonl(path, obj=False)[1] == (2, [1, 2])
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(UserError, match=rf"{path}: row 3: not valid JSON"):
        read_jsonl(path)


def test_the_caller_picks_the_error_type():
    class RowError(ValueError):
        pass

    with pytest.raises(RowError, match="metadata row 7: not valid JSON"):
        parse_json("{oops", "metadata row 7", RowError)
    assert parse_json('"text"', "x", obj=False) == "text"
