"""The built wheel installs one top-level package, `argrpo`, and every module of it imports from a working directory
that has its own `models/`, `data/` and `recipes/` packages (a typical ML project's layout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The repository folders that install under `argrpo.` (setup.cfg's package_dir).
MAPPED = {"argrpo": "argrpo", "grpo": "argrpo/grpo", "rewards": "argrpo/rewards", "rollout": "argrpo/rollout",
          "recipes": "argrpo/recipes", "models": "argrpo/models", "data": "argrpo/data"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a temporary target folder.

    It is built from a copy of the files git knows (tracked, or untracked and not ignored): setuptools reuses the
    checkout's build/ folder, which still holds modules since removed or renamed, and would pack them too.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp / "dist")], check=True, cwd=tmp, capture_output=True)
    wheels = list((tmp / "dist").glob("argrpo-*.whl"))
    assert len(wheels) == 1, wheels
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheels[0])],
                   check=True, capture_output=True)
    return target


def test_wheel_installs_only_argrpo(installed):
    top = {p.name for p in installed.iterdir()} - {"bin"}
    assert {n for n in top if not n.endswith(".dist-info")} == {"argrpo"}


def test_wheel_holds_every_source_module(installed):
    """setup.cfg lists packages by hand (package_dir remaps folders); a package left off that list would be missing."""
    source = set()
    for folder, dest in MAPPED.items():
        for p in (ROOT / folder).rglob("*.py"):
            source.add(f"{dest}/{p.relative_to(ROOT / folder).as_posix()}")
    wheel = {p.relative_to(installed).as_posix() for p in (installed / "argrpo").rglob("*.py")}
    assert wheel == source
    assert list((installed / "argrpo" / "recipes" / "configs").glob("*/*.yaml")), "shipped configs are package data"


def test_every_module_imports_beside_a_users_own_packages(installed, tmp_path):
    project = tmp_path / "project"
    for name in ("models", "data", "recipes", "grpo", "rewards", "rollout"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    modules = sorted(".".join(p.relative_to(installed).with_suffix("").parts).removesuffix(".__init__")
                     for p in (installed / "argrpo").rglob("*.py"))
    script = (
        "import importlib, sys\n"
        f"target = {str(installed)!r}\n"
        "bad = []\n"
        f"for name in {modules!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    if not mod.__file__.startswith(target):\n"
        "        bad.append((name, mod.__file__))\n"
        "print('imported', len(sys.modules))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": f"{project}:{installed}", "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout
    # the console script resolves to the installed package too
    proc = subprocess.run([sys.executable, "-m", "argrpo.recipes.cli", "--help"], cwd=project, capture_output=True,
                          text=True, env={"PYTHONPATH": f"{project}:{installed}", "PATH": "/usr/bin:/bin",
                                          "HOME": str(tmp_path)})
    assert proc.returncode == 0 and "grpo" in proc.stdout, proc.stderr[-2000:]
