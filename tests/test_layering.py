"""Which package may import which, read statically from the source (every import statement, lazy ones included):
the library never imports ``recipes/`` (the CLI wiring), and ``data/`` may use ``rewards/`` but not the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# repository folder -> installed package name
PACKAGES = {"argrpo": "argrpo", "grpo": "argrpo.grpo", "rewards": "argrpo.rewards", "rollout": "argrpo.rollout",
            "recipes": "argrpo.recipes", "models": "argrpo.models", "data": "argrpo.data"}
# `python -m argrpo` is a command-line entry point, like the console script
ENTRY_POINTS = {"argrpo/__main__.py"}


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports resolved against its package."""
    rel = path.relative_to(root)
    package = ".".join([PACKAGES[rel.parts[0]], *rel.parts[1:-1]]) if rel.parts[0] != "argrpo" else "argrpo"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names] + [(node.lineno, base)]
    return out


def offending(folders: list[str], forbidden: str, root: Path = REPO) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in ENTRY_POINTS:
                continue
            for line, module in imported_modules(path, root):
                if module == forbidden or module.startswith(forbidden + "."):
                    found.append(f"{rel}:{line} imports {module}")
    return sorted(set(found))


def test_library_never_imports_recipes():
    assert offending([f for f in PACKAGES if f != "recipes"], "argrpo.recipes") == []


@pytest.mark.parametrize("folder, forbidden", [("rewards", "argrpo.data")])
def test_one_way_between_data_and_rewards(folder, forbidden):
    assert offending([folder], forbidden) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The scanner itself: an import inside a function and a relative import both count."""
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "probe.py").write_text("def f():\n    from argrpo.recipes import cli\n\nfrom ..recipes import config\n")
    assert offending(["grpo"], "argrpo.recipes", root=tmp_path) == [
        "grpo/probe.py:2 imports argrpo.recipes", "grpo/probe.py:2 imports argrpo.recipes.cli",
        "grpo/probe.py:4 imports argrpo.recipes", "grpo/probe.py:4 imports argrpo.recipes.config"]
