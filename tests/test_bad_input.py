"""Bad input, one test per case: each fails with an error that names the file, key or row at fault, and leaves
nothing half-written (the run directory holds no file, a previous checkpoint stays as it was).

Runs go through the same entry points a user calls: ``argrpo grpo`` (recipes.cli.main) for config problems,
``grpo.trainer.train`` for the rest, on the tiny shapes world of tests/grpo_fixtures.py.
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
from argrpo.config import load_config
from argrpo.grpo.config import GRPORunConfig
from argrpo.grpo.trainer import train
from argrpo.recipes.cli import main as argrpo
from argrpo.rewards.base import RewardError
from grpo_fixtures import run_overrides, shared_world

BAD_REWARDS = textwrap.dedent('''
    """Rewards that break the reward contract in the ways a user's plugin can."""
    def wrong_length(prompts, images, **kwargs):
        return [0.5] * (len(images) - 1)

    def nan(prompts, images, **kwargs):
        return [float("nan")] + [0.5] * (len(images) - 1)

    def raises(prompts, images, **kwargs):
        raise KeyError("no such field 'aesthetics'")
''')


@pytest.fixture(scope="module")
def world():
    return shared_world()


@pytest.fixture
def plugins(world, tmp_path, monkeypatch):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "bad_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.syspath_prepend(str(world["plugins"]))
    return d


def cfg_of(world, out: Path, **kw) -> GRPORunConfig:
    return load_config(GRPORunConfig, None, run_overrides(world, out, **kw))


def written_files(out: Path) -> list[str]:
    """Every file under a run directory (an empty or absent directory is 'nothing written')."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []


def run_cli(world, out: Path, yaml_text: str | None, tmp_path: Path, *sets: str, capsys) -> tuple[int, str]:
    """`argrpo grpo <yaml> --set ...` in-process -> (exit code, stderr)."""
    argv = ["grpo"]
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv.append(str(path))
    for s in sets:
        argv += ["--set", s]
    rc = argrpo(argv)
    return rc, capsys.readouterr().err


def base_yaml(world, out: Path, extra: str = "") -> str:
    return (f"output_dir: {out}\n"
            f"policy: {{checkpoint: {world['policy']}}}\n"
            "rewards: [{name: 'user_rewards:redness'}]\n"
            f"data: {{train_prompts: {world['train']}}}\n"
            "rollout: {num_workers: 0}\n" + extra)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROW = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}


# ---- configs ------------------------------------------------------------------------------------------------------
def test_unknown_config_key(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(world, out, base_yaml(world, out, "grpo: {lerning_rate: 0.1}\n"), tmp_path, capsys=capsys)
    assert rc == 2
    assert f"{tmp_path / 'run.yaml'}: grpo.lerning_rate: unknown key" in err
    assert "learning_rate" in err  # the valid keys are listed
    assert not out.exists()


def test_wrong_type(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(world, out, base_yaml(world, out), tmp_path, "grpo.max_steps=ten", capsys=capsys)
    assert rc == 2
    assert "grpo.max_steps: expected int, got 'ten'" in err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    rc = argrpo(["grpo", str(tmp_path / "nope.yaml")])
    assert rc == 2
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in capsys.readouterr().err


def test_group_size_below_two(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(world, out, base_yaml(world, out), tmp_path, "grpo.num_generations=1",
                      "grpo.per_device_train_batch_size=4", capsys=capsys)
    assert rc == 2
    assert "grpo.num_generations must be >= 2" in err and "got 1" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["unknown reward", "bad prompt row", "missing checkpoint"])
def test_user_errors_through_the_cli_are_one_line(world, plugins, tmp_path, capsys, case):
    """`argrpo grpo` prints a user error as one line and exits 2: no traceback, nothing written."""
    out = tmp_path / "out"
    if case == "unknown reward":
        sets, expected = ["rewards=[{name: geneval_dens}]"], "argrpo grpo: unknown reward 'geneval_dens'; registered: ["
    elif case == "bad prompt row":
        bad = write_jsonl(tmp_path / "p.jsonl", [GOOD_ROW, {"tag": "single_object", "prompt": "a circle"}])
        sets, expected = [f"data.train_prompts={bad}"], f"argrpo grpo: {bad}: row 2: missing key 'include'"
    else:
        missing = tmp_path / "sft-final"
        sets, expected = [f"policy.checkpoint={missing}"], f"argrpo grpo: policy checkpoint not found: {missing}"
    rc, err = run_cli(world, out, base_yaml(world, out), tmp_path, *sets, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(expected), err
    assert not out.exists()


# ---- prompts ------------------------------------------------------------------------------------------------------
def test_missing_prompt_file(world, plugins, tmp_path):
    missing = tmp_path / "prompts" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=f"{missing}: prompt file not found"):
        train(cfg_of(world, tmp_path / "out", **{"data.train_prompts": str(missing)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_prompt_row_without_prompt(world, plugins, tmp_path):
    row = {k: v for k, v in GOOD_ROW.items() if k != "prompt"}
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_ROW, GOOD_ROW, row])
    with pytest.raises(ValueError, match=rf"{path}: row 3: .*'prompt'"):
        train(cfg_of(world, tmp_path / "out", **{"data.train_prompts": str(path)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_prompt_row_that_is_not_json(world, plugins, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_ROW, '{"tag": "single_object", "prompt": "a photo of'])
    with pytest.raises(ValueError, match=rf"{path}: row 2: not valid JSON"):
        train(cfg_of(world, tmp_path / "out", **{"data.train_prompts": str(path)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_geneval_row_with_unknown_tag(world, plugins, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_ROW, {**GOOD_ROW, "tag": "countng"}])
    with pytest.raises(ValueError, match=rf"{path}: row 2: unknown tag 'countng'.*counting"):
        train(cfg_of(world, tmp_path / "out", **{"data.train_prompts": str(path)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_empty_prompt_set(world, plugins, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"{path}: no prompts"):
        train(cfg_of(world, tmp_path / "out", **{"data.train_prompts": str(path)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


# ---- rewards ------------------------------------------------------------------------------------------------------
def test_reward_name_that_does_not_exist(world, plugins, tmp_path):
    with pytest.raises(ValueError, match=r"unknown reward 'geneval_dens'; registered: \[.*'geneval_dense'"):
        train(cfg_of(world, tmp_path / "out", rewards="[{name: geneval_dens}]"))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_plugin_path_that_does_not_import(world, plugins, tmp_path):
    with pytest.raises(ValueError, match="reward 'my_rewardz:score': cannot import module 'my_rewardz'"):
        train(cfg_of(world, tmp_path / "out", rewards="[{name: 'my_rewardz:score'}]"))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_plugin_path_without_that_function(world, plugins, tmp_path):
    with pytest.raises(ValueError, match="module 'user_rewards' has no attribute 'rednes'"):
        train(cfg_of(world, tmp_path / "out", rewards="[{name: 'user_rewards:rednes'}]"))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


@pytest.mark.parametrize("fn, message", [
    ("wrong_length", r"reward 'wrong_length' \(step 0, 8 samples, first prompt '.*'\): returned 7 scores for 8"),
    ("nan", r"reward 'nan' \(step 0, 8 samples.*\): score 0 is nan \(NaN/inf is never a valid reward"),
    ("raises", r"reward 'raises' \(step 0, 8 samples.*\) raised KeyError: .*no such field 'aesthetics'"),
], ids=["wrong_length", "nan", "raising"])
def test_reward_breaking_its_contract(world, plugins, tmp_path, fn, message):
    """Wrong length, NaN, or an exception: the step fails naming the reward and the batch; no checkpoint, no
    metrics line, no final policy is written for it."""
    out = tmp_path / "out"
    cfg = cfg_of(world, out, rewards=f"[{{name: 'bad_rewards:{fn}'}}]", **{"checkpoint.every": 1,
                                                                            "checkpoint.save_final": True})
    with pytest.raises(RewardError, match=message):
        train(cfg)
    assert written_files(out) == []


# ---- checkpoints and image tokenizers ----------------------------------------------------------------------------
def test_missing_policy_checkpoint(world, plugins, tmp_path):
    missing = tmp_path / "sft-final"
    with pytest.raises(FileNotFoundError, match=f"policy checkpoint not found: {missing}"):
        train(cfg_of(world, tmp_path / "out", **{"policy.checkpoint": str(missing)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_checkpoint_of_a_different_layout(world, plugins, tmp_path):
    ckpt = world["policy"]
    # the checkpoint's own argrpo.json is the authority; a config naming another layout preset is refused
    with pytest.raises(ValueError, match=f"checkpoint {ckpt}: layout mismatch on 'name': expected 'simplear', "
                                         f"found 'shapes'"):
        train(cfg_of(world, tmp_path / "out", **{"policy.layout": "simplear"}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def _copy_policy(world, dst: Path) -> Path:
    import shutil

    shutil.copytree(world["policy"], dst)
    return dst


def test_checkpoint_weights_truncated(world, plugins, tmp_path):
    ckpt = _copy_policy(world, tmp_path / "policy")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt}: cannot read its weights \(SafetensorError: .*"
                                         rf"incomplete"):
        train(cfg_of(world, tmp_path / "out", **{"policy.checkpoint": str(ckpt)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_resume_from_a_checkpoint_of_a_different_codebook_size(world, plugins, tmp_path):
    """--resume finds a checkpoint of another policy (another image tokenizer's codebook) in output_dir: refused
    by name before any weight is loaded, and the checkpoint is left untouched."""
    from argrpo.models.layout import TokenLayout

    out = tmp_path / "out"
    train(cfg_of(world, out, **{"grpo.max_steps": 1, "checkpoint.every": 1}))
    ckpt = out / "checkpoints" / "step-0000001"
    meta_file = ckpt / "argrpo.json"
    meta = json.loads(meta_file.read_text())
    other = TokenLayout.from_dict(meta["layout"]).to_dict()
    other["codebook_size"] = meta["layout"]["codebook_size"] * 2
    meta_file.write_text(json.dumps({**meta, "layout": other}))
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    with pytest.raises(ValueError, match=rf"{ckpt}.*'codebook_size'"):
        train(cfg_of(world, out, **{"grpo.max_steps": 2, "checkpoint.every": 1}), resume=True)
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]


def test_resume_with_a_different_batch_shape(world, plugins, tmp_path):
    """Resuming with another number of prompts per step would silently shift the data order: refused, naming the
    checkpoint's run file and the key."""
    out = tmp_path / "out"
    train(cfg_of(world, out, **{"grpo.max_steps": 1, "checkpoint.every": 1}))
    with pytest.raises(ValueError, match=r"step-0000001/argrpo_run.json: .*prompts_per_generation.*2.*4"):
        train(cfg_of(world, out, **{"grpo.max_steps": 2, "checkpoint.every": 1,
                                    "grpo.per_device_train_batch_size": 16}), resume=True)


def test_image_tokenizer_grid_does_not_match_layout(world, plugins, tmp_path):
    from argrpo.models.image_tokenizers import load_image_tokenizer
    from argrpo.models.image_tokenizers.vq import VQTokenizer

    ckpt = _copy_policy(world, tmp_path / "policy")
    vq = load_image_tokenizer(ckpt / "image_tokenizer")
    VQTokenizer(vq.masks, vq.colors, vq.background, grid=(4, 4)).save_pretrained(ckpt / "image_tokenizer")
    with pytest.raises(ValueError, match=rf"image tokenizer {ckpt / 'image_tokenizer'}: grid \(4, 4\) does not "
                                         rf"match the layout's \(8, 8\)"):
        train(cfg_of(world, tmp_path / "out", **{"policy.checkpoint": str(ckpt)}))
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_rollout_worker_with_an_image_tokenizer_of_another_codebook(world):
    """The same check where every rollout path meets the tokenizer (argrpo sample, eval, Ray workers)."""
    from argrpo.models.image_tokenizers import load_image_tokenizer
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.policy import load_policy
    from argrpo.rollout.worker import PolicyComponents, RolloutWorker

    loaded = load_policy(world["policy"])
    vq = load_image_tokenizer(world["policy"] / "image_tokenizer")
    smaller = VQTokenizer(vq.masks[:1], vq.colors, vq.background, grid=vq.grid)  # fewer masks: a smaller codebook
    assert smaller.codebook_size != vq.codebook_size
    with pytest.raises(ValueError, match=rf"image tokenizer VQTokenizer: codebook_size {smaller.codebook_size} does "
                                         rf"not match the layout's {vq.codebook_size}"):
        RolloutWorker(PolicyComponents(loaded.model, loaded.layout, loaded.tokenizer, smaller))


# ---- infrastructure -----------------------------------------------------------------------------------------------
def test_ray_address_that_does_not_answer(world, tmp_path):
    """Port 1 on loopback: nothing listens there. `argrpo grpo --ray-address` ends with an error naming the address
    (a socket probe first, instead of Ray's own minute of connection retries) before anything is written. A fresh
    process, as a user runs it (a Ray already started in this one would be reused)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    path = tmp_path / "run.yaml"
    path.write_text(base_yaml(world, out).replace("rollout: {num_workers: 0}", "rollout: {num_workers: 1}"))
    proc = subprocess.run([sys.executable, "-m", "argrpo.recipes.cli", "grpo", str(path), "--ray-address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Ray address '127.0.0.1:1' does not answer" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert not out.exists()


def test_full_output_disk(world, plugins, tmp_path, monkeypatch):
    """ENOSPC while the step-2 checkpoint's weights are written: the error names the checkpoint path, step 1's
    checkpoint stays complete and loadable, and no temp directory is left behind."""
    import transformers.modeling_utils as mu
    from argrpo.grpo.checkpointing import list_checkpoints
    from argrpo.models.policy import load_policy

    out = tmp_path / "out"
    cfg = cfg_of(world, out, **{"grpo.max_steps": 2, "checkpoint.every": 1, "checkpoint.keep": 2})
    real_save = mu.safe_save_file
    calls = []

    def disk_full_on_second_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 1024)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", disk_full_on_second_save)
    step2 = out / "checkpoints" / "step-0000002"
    with pytest.raises(OSError, match=rf"{step2}.*No space left on device") as info:
        train(cfg)
    assert info.value.errno == errno.ENOSPC
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no temp dir left
    loaded = load_policy(out / "checkpoints" / "step-0000001")
    assert loaded.layout == world["layout"]
    assert json.loads((out / "checkpoints" / "step-0000001" / "trainer_state.json").read_text())["global_step"] == 1
