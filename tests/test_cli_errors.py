"""User errors through the real entry point (recipes.cli.main): one line, ``argrpo <command>: <message>``, exit
status 2, no traceback; ``--debug`` or ARGRPO_DEBUG=1 prints the traceback before that line. A bug (any other
exception) still propagates with its traceback."""

from __future__ import annotations

import numpy as np
import pytest
from argrpo.recipes.cli import main
from PIL import Image


@pytest.fixture
def flat_folder(tmp_path):
    """One image and its one prompt: what `argrpo score` needs to get as far as building the rewards."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / "0.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\n")
    return images, prompts


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_unknown_reward_name(flat_folder, capsys):
    images, prompts = flat_folder
    assert main(["score", "--reward", "geneval_dens", "--prompts", str(prompts), "--images", str(images)]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("argrpo score: unknown reward 'geneval_dens'; registered: [")
    assert "'geneval_dense'" in lines[0]


def test_bad_prompt_row(flat_folder, tmp_path, capsys):
    images, _ = flat_folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n\n{"caption": "a blue square"}\n')
    assert main(["score", "--reward", "geneval", "--prompts", str(bad), "--images", str(images)]) == 2
    assert stderr_lines(capsys) == [
        f"argrpo score: {bad}: row 3: expected an object with a string 'prompt' (non-empty)"]


def test_missing_checkpoint(flat_folder, tmp_path, capsys):
    _, prompts = flat_folder
    missing = tmp_path / "no-such-checkpoint"
    assert main(["sample", "--checkpoint", str(missing), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert stderr_lines(capsys) == [f"argrpo sample: policy checkpoint not found: {missing}"]


def test_multi_line_messages_are_joined(tmp_path, capsys):
    """A YAML parser's message spans lines; the user still gets one."""
    path = tmp_path / "run.yaml"
    path.write_text("grpo: {beta: [0.1\n")
    assert main(["grpo", str(path)]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"argrpo grpo: {path}: not valid YAML"), lines


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(flat_folder, monkeypatch, capsys, how):
    images, prompts = flat_folder
    argv = ["score", "--reward", "nope", "--prompts", str(prompts), "--images", str(images)]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("ARGRPO_DEBUG", "1")
    assert main(argv) == 2
    lines = stderr_lines(capsys)
    assert lines[0] == "Traceback (most recent call last):"
    assert any("UnknownNameError: unknown reward 'nope'" in line for line in lines)
    assert lines[-1].startswith("argrpo score: unknown reward 'nope'")


def test_a_bug_is_not_a_user_error(flat_folder, tmp_path, monkeypatch):
    """An exception that is not a user error is left to Python, traceback and all."""
    images, prompts = flat_folder
    plugin = tmp_path / "broken_reward.py"
    plugin.write_text("class Broken:\n    def __init__(self, **kwargs):\n        raise RuntimeError('bug in the plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="bug in the plugin"):
        main(["score", "--reward", "broken_reward:Broken", "--prompts", str(prompts), "--images", str(images)])
