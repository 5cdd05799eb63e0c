"""Fine-tuning a released SimpleAR checkpoint, in miniature: a directory laid out like the release (Qwen2 + 7 special
tokens + 64,000 visual rows, no argrpo.json) and a Cosmos TorchScript decoder -> `argrpo convert` -> `argrpo sample`
-> a GRPO step with a user's reward. Real code paths; tiny random weights."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from argrpo.recipes.cli import main
from grpo_fixtures import PLUGIN_SOURCE
from PIL import Image
from test_cosmos import ColourDecoder, PatchEncoder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from argrpo.models.text_tokenizer import simplear_test_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("release")
    tok = simplear_test_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok) + 64000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "SimpleAR-tiny")
    tok.save_pretrained(root / "SimpleAR-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (root / "cosmos").mkdir()
        torch.jit.script(PatchEncoder()).save(str(root / "cosmos" / "encoder.jit"))
        torch.jit.script(ColourDecoder()).save(str(root / "cosmos" / "decoder.jit"))
    return root


def test_convert_sample_and_grpo(release, tmp_path, monkeypatch):
    ckpt = tmp_path / "argrpo-ckpt"
    assert main(["convert", "--simplear", str(release / "SimpleAR-tiny"), "--cosmos", str(release / "cosmos"),
                 "--out", str(ckpt), "--resolution", "256"]) == 0
    meta = json.loads((ckpt / "argrpo.json").read_text())
    assert meta["layout"]["name"] == "simplear" and meta["layout"]["codebook_size"] == 64000
    assert meta["layout"]["grid"] == [16, 16]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red cat\na photo of a blue dog\n")
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--n", "2", "--cfg", "3",
                 "--out", str(out), "--seed", "0"]) == 0
    img = np.asarray(Image.open(out / "00000" / "samples" / "00001.png"))
    assert img.shape == (256, 256, 3)

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "user_rewards.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(plugins))
    from argrpo.config import load_config
    from argrpo.grpo.config import GRPORunConfig
    from argrpo.grpo.trainer import train

    cfg = load_config(GRPORunConfig, None, [
        f"output_dir={tmp_path / 'grpo'}", f"policy.checkpoint={ckpt}",
        "rewards=[{name: 'user_rewards:redness'}]", f"data.train_prompts={prompts}", "rollout.num_workers=0",
        "grpo.num_generations=2", "grpo.per_device_train_batch_size=4", "grpo.max_steps=1",
        "grpo.learning_rate=0.01", "logging.report_to=[]", "logging.image_every=0", "logging.progress=false",
        "threads=1",
    ])
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["final"]
    tuned = json.loads((tmp_path / "grpo" / "final" / "argrpo.json").read_text())
    assert tuned["layout"] == meta["layout"]
