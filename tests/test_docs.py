"""Every documented command runs: each command in README.md's bash blocks and the header command (first line) of every
shipped YAML (recipes/configs/*/*.yaml), with tiny overrides (steps, sizes, prompts) appended, in one temporary
working directory. The shapes recipes' header commands run first, in their order (tokenizer, pretrain, SFT, GRPO,
eval), and later commands reuse what they wrote (runs/shapes/...), as a user following the README would.

Markers: a README command whose trailing comment carries one of these tags is not run here, and its test is skipped
naming why: ``[GPU]`` needs a CUDA machine, ``[weights]`` needs downloaded model weights, ``[long]`` runs longer than
a test may (a tiny form of it runs under another name), ``[cluster]`` needs a multi-node Ray cluster. A YAML header
that names a placeholder path (``/path/to/...``) needs the user's weights and is skipped the same way; a YAML header
may carry the same tags in a trailing comment. A documented
command of a kind this file cannot run fails until it is marked or taught here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIGS = REPO / "recipes" / "configs"
TAGS = {"GPU": "needs a CUDA GPU", "weights": "needs downloaded model weights",
        "long": "runs longer than a test may", "cluster": "needs a multi-node Ray cluster"}
PLACEHOLDERS = {"CONFIG": "recipes/configs/shapes/grpo.yaml", "N": "2"}
# commands marked [long] whose tiny form runs here under another name
TINY_FORM = {"make demo": "recipes/configs/shapes/pipeline.yaml's header command, `argrpo pipeline ...`"}
STAGES = ("tokenizer", "pretrain", "sft", "grpo", "eval")  # the shapes recipes, each reading the one before

# appended to a command of that subcommand (later `--set`s win): seconds instead of hours
TINY = {
    "tokenizer": ["n_images=200"],
    "pretrain": ["policy.size=tiny", "data.shapes_n=256", "train.max_steps=3", "train.batch_size=16",
                 "train.report_to=[]"],
    "sft": ["data.shapes_n=128", "train.max_steps=2", "train.batch_size=16", "train.report_to=[]"],
    "grpo": ["grpo.max_steps=2", "grpo.num_generations=2", "grpo.per_device_train_batch_size=4",
             "grpo.steps_per_generation=1", "logging.report_to=[]", "logging.image_every=0", "checkpoint.every=0",
             "eval.every=0", "threads=1"],
    "eval": ["shapes_per_tag=2", "sampling.n=2"],
}
TINY["pipeline"] = ["overrides=" + json.dumps({k: v for k, v in TINY.items()}), "grid_prompts=3", "grid_samples=2"]


@dataclass
class Command:
    source: str  # "README.md:95" or "recipes/configs/shapes/grpo.yaml"
    text: str  # the command without its trailing comment
    tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.source} {self.text[:60]}"


def _split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` -> (cmd, comment); a ``#`` inside quotes or a word is part of the command."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: str | None = None) -> list[Command]:
    """The commands of README.md's bash/sh/console blocks (continuation lines joined, comment lines dropped)."""
    text = README.read_text() if text is None else text
    out, block, pending, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence:
            block = None if block is not None else fence.group(1).lower()
            continue
        if block not in ("bash", "sh", "shell", "console"):
            continue
        cmd, comment = _split_comment(line.strip().removeprefix("$ "))
        if not pending:
            start = n
        if cmd.endswith("\\"):
            pending += cmd[:-1].strip() + " "
            continue
        cmd = (pending + cmd).strip()
        pending = ""
        if cmd:
            tags = [t for t in TAGS if f"[{t}]" in comment]
            out.append(Command(f"README.md:{start}", cmd, tags))
    return out


def yaml_header_commands() -> list[Command]:
    """The first line of every shipped YAML: ``# argrpo <command> <that file> ...``."""
    out = []
    # each folder's stages in pipeline order, the shapes ones first (other folders read their tokenizer)
    def order(p: Path):
        return (p.parent.name != "shapes", p.parent.name, STAGES.index(p.stem) if p.stem in STAGES else 99, p.name)

    for path in sorted(CONFIGS.glob("*/*.yaml"), key=order):
        first = path.read_text().splitlines()[0]
        cmd, comment = _split_comment(first.lstrip("#").strip())
        text = cmd.split("  ")[0].strip()  # a header may add a note after two spaces, e.g. "(what `make demo` runs)"
        tags = [t for t in TAGS if f"[{t}]" in comment] + (["weights"] if "/path/to/" in text else [])
        out.append(Command(str(path.relative_to(REPO)), text, tags))
    return out


COMMANDS = yaml_header_commands() + readme_commands()


class Workspace:
    """One working directory for every documented command; the shapes stages run once, on first need."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, tuple[int, float]] = {}  # command text -> (exit status, seconds)
        self.headers = {c.source: c for c in COMMANDS if c.source.startswith("recipes/")}

    def stage(self, name: str, folder: str = "shapes") -> None:
        """Make sure recipe ``name`` of ``folder`` (and the stages before it) ran, by their own header commands; a
        folder without a stage of its own reads the shapes one (e.g. the image tokenizer)."""
        for prior in STAGES[: STAGES.index(name) + 1]:
            path = CONFIGS / folder / f"{prior}.yaml"
            path = path if path.is_file() else CONFIGS / "shapes" / f"{prior}.yaml"
            self.run_once(self.headers[str(path.relative_to(REPO))].text)

    def prerequisites(self, text: str) -> None:
        m = re.search(r"argrpo (?:tokenizer train|\w+) recipes/configs/(\w+)/(\w+)\.yaml$", text)
        if m and f"recipes/configs/{m.group(1)}/{m.group(2)}.yaml" not in self.headers:
            m = None
        if m and m.group(2) in STAGES:
            folder, name = m.groups()
            if name != "tokenizer":
                self.stage("sft" if name == "eval" else STAGES[STAGES.index(name) - 1], folder)
            return
        if "runs/demo" in text:
            self.run_once(self.headers["recipes/configs/shapes/pipeline.yaml"].text)
        if any(s in text for s in ("recipes/configs/shapes", "runs/shapes", "CONFIG")):
            self.stage("sft")

    def run_once(self, text: str) -> None:
        if text not in self.results:
            self.run(text)
        if self.results[text][0] != 0:
            pytest.fail(f"needs `{text}` first, which exited with {self.results[text][0]}")

    def run(self, text: str) -> int:
        """Run one documented command here with its tiny overrides; returns (and records) its exit status."""
        if text in self.results:
            return self.results[text][0]
        self.prerequisites(text)
        words = shlex.split(text)
        env = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        words = [PLACEHOLDERS.get(w, w) for w in words]
        prog = words[0]
        t0 = time.perf_counter()
        if prog in ("argrpo", ".venv/bin/argrpo"):
            code = self._argrpo(words[1:], env, text)
        elif prog in ("python", "python3") and words[1:3] == ["-m", "torch.distributed.run"]:
            code = self._subprocess([sys.executable, *words[1:], *self._tiny(words[words.index("argrpo") + 1:],
                                                                             text)], env)
        elif prog in ("open", "xdg-open"):
            code = 0 if (self.root / words[1]).exists() else 1
        else:
            pytest.fail(f"no way to run `{text}` here: teach tests/test_docs.py, or mark it in the README "
                        f"({', '.join(f'[{t}]' for t in TAGS)})")
        self.results[text] = (code, time.perf_counter() - t0)
        return code

    def _tiny(self, args: list[str], text: str) -> list[str]:
        """The tiny overrides for ``argrpo <args>``; runs that would share an output directory get their own."""
        sub = "tokenizer" if args[:2] == ["tokenizer", "train"] else args[0]
        extra = [x for item in TINY.get(sub, []) for x in ("--set", item)]
        if sub == "grpo" and "recipes/configs/shapes/grpo.yaml" != text.removeprefix("argrpo grpo ").strip():
            extra += ["--set", f"output_dir=runs/docs/{len(self.results)}"]
        if sub == "sweep":
            extra = ["--seeds", "1"] + [x for item in TINY["grpo"] for x in ("--set", item)]
        return extra

    @staticmethod
    def _shrink_grid(args: list[str]) -> list[str]:
        """A sweep keeps its first grid key's values and the first value of every other key: 2 trials, not 8."""
        out, grids = [], 0
        for i, a in enumerate(args):
            if i and args[i - 1] == "--grid":
                grids += 1
                if grids > 1:
                    key, values = a.split("=", 1)
                    a = f"{key}={values.split(',')[0]}"
            out.append(a)
        return out

    def _argrpo(self, args: list[str], env: dict, text: str) -> int:
        from argrpo.recipes.cli import main

        if args[0] == "sweep":
            args = self._shrink_grid(args)
        argv = args + ([] if any(a in ("--help", "-h", "--describe") for a in args) else self._tiny(args, text))
        added = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p]
        threads = torch.get_num_threads()
        sys.path[:0] = [str(self.root / p) for p in added]
        try:
            return main(argv) or 0
        except SystemExit as e:  # argparse's --help exits 0
            return e.code or 0
        finally:
            for p in added:
                sys.path.remove(str(self.root / p))
            torch.set_num_threads(threads)

    def _subprocess(self, argv: list[str], env: dict) -> int:
        full = dict(os.environ, OMP_NUM_THREADS="1", **env)
        proc = subprocess.run(argv, cwd=self.root, env=full, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            print(proc.stderr[-4000:])
        return proc.returncode


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The working directory, holding the README's own Python snippets (e.g. my_rewards.py) as files."""
    root = tmp_path_factory.mktemp("docs")
    (root / "recipes").symlink_to(REPO / "recipes")  # commands name the shipped configs as a clone has them
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        first = block.splitlines()[0]
        m = re.match(r"#\s*(\w+\.py)\b", first)
        if m:
            (root / m.group(1)).write_text(block)
    before = os.getcwd()
    os.chdir(root)
    ws = Workspace(root)
    yield ws
    os.chdir(before)
    print("\ndocumented commands (exit status, seconds):")
    for text, (code, s) in ws.results.items():
        print(f"  {code}  {s:6.1f} s  {text}")


def test_readme_has_commands_and_markers_parse():
    cmds = readme_commands()
    assert cmds, "README.md has no bash blocks"
    sample = readme_commands("```bash\nfoo --x 'a # b' \\\n  --y 1   # [GPU] [long] why\n# a comment\n```\n")
    assert [(c.text, c.tags) for c in sample] == [("foo --x 'a # b' --y 1", ["GPU", "long"])]
    assert all(re.match(r"(argrpo|python -m torch\.distributed\.run .* -m argrpo) ", c.text)
               for c in yaml_header_commands())


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.id)
def test_documented_command_runs(cmd, workspace, request):
    if cmd.tags:
        also = f"; its tiny form runs as {TINY_FORM[cmd.text]}" if cmd.text in TINY_FORM else ""
        pytest.skip(f"{cmd.source}: {'; '.join(TAGS[t] for t in cmd.tags)}{also}")
    if cmd.text == "make test":
        pytest.skip("the test suite this test is part of")
    if cmd.text.startswith("make "):
        pytest.fail(f"{cmd.source}: `{cmd.text}`: mark it ([long] ...) and name the command that runs its tiny form")
    if " sweep " in f" {cmd.text} ":
        request.getfixturevalue("ray_cluster")  # the session's local Ray cluster, shared with other Ray tests
    code = workspace.run(cmd.text)
    assert code == 0, f"{cmd.source}: `{cmd.text}` exited with {code}"
