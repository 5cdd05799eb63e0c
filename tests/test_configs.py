"""Every shipped YAML under recipes/configs/ loads and validates against its config class.

The class is found from the file's stem (one YAML per model x stage, torchtune style). A new YAML whose stem
matches no rule fails with a message saying where to add one.
"""

import fnmatch
import importlib
from pathlib import Path

import pytest
from argrpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "recipes" / "configs"

# (stem pattern, "module:Class"), first match wins
CONFIG_CLASSES = (
    ("tokenizer", "argrpo.recipes.commands.tokenizer:TokenizerTrainConfig"),
    ("pretrain", "argrpo.grpo.lm_stage:PretrainConfig"),
    ("sft", "argrpo.grpo.lm_stage:SFTConfig"),
    ("*_sft", "argrpo.grpo.lm_stage:SFTConfig"),
    ("eval", "argrpo.grpo.evaluate:EvalRunConfig"),
    ("grpo", "argrpo.grpo.config:GRPORunConfig"),
    ("*_grpo_*", "argrpo.grpo.config:GRPORunConfig"),
    ("*_grpo", "argrpo.grpo.config:GRPORunConfig"),
    ("pipeline", "argrpo.recipes.commands.pipeline:PipelineConfig"),
)

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


def config_class(path: Path):
    for pattern, target in CONFIG_CLASSES:
        if fnmatch.fnmatchcase(path.stem, pattern):
            module, name = target.split(":")
            return getattr(importlib.import_module(module), name)
    raise LookupError(
        f"{path}: no config class for stem {path.stem!r}; name the file after its stage "
        f"({', '.join(p for p, _ in CONFIG_CLASSES)}) or add a rule to CONFIG_CLASSES in tests/test_configs.py"
    )


def test_configs_are_shipped():
    assert len(SHIPPED) >= 4, f"expected the shipped configs under {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    cfg = load_config(config_class(path), path)
    assert cfg is not None


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_header_gives_the_command_line(path):
    from argrpo.recipes.cli import build_parser
    from argrpo.recipes.commands import COMMANDS

    build_parser()  # registers every command
    first = path.read_text().splitlines()[0]
    words = first.split()
    rel = str(path.relative_to(ROOT))
    # '# argrpo <command> ...', or for recipes that need several processes the launcher form
    # '# python -m torch.distributed.run ... -m argrpo <command> ...'
    launched = words[:2] == ["#", "python"] and "torch.distributed.run" in words and "argrpo" in words
    at = words.index("argrpo") if launched else 1
    assert (words[:2] == ["#", "argrpo"] or launched) and words[at + 1] in COMMANDS, \
        f"{rel}: first line must be '# argrpo <command> ...' (or its torch.distributed.run form)"
    assert rel in words, f"{rel}: the header command line must name the file itself, got {first!r}"


def test_pipeline_configs_point_at_existing_stage_configs():
    for path in SHIPPED:
        if path.stem != "pipeline":
            continue
        cfg = load_config(config_class(path), path)
        for stage in ("tokenizer", "pretrain", "sft", "grpo", "eval"):
            assert (path.parent / getattr(cfg, stage)).is_file(), f"{path}: {stage} config not found"


def test_unmapped_yaml_fails_with_a_clear_message(tmp_path):
    with pytest.raises(LookupError, match="no config class for stem 'finetune_v2'.*CONFIG_CLASSES"):
        config_class(tmp_path / "finetune_v2.yaml")
    assert config_class(Path("llamagen_grpo_hps.yaml")).__name__ == "GRPORunConfig"
