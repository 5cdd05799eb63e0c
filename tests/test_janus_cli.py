"""`argrpo sample`, `eval` and `grpo` on a tiny Janus-Pro directory as transformers ships it (no argrpo.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from argrpo.recipes.cli import main
from grpo_fixtures import PLUGIN_SOURCE
from janus_fixtures import save_tiny_janus
from PIL import Image

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus_cli")
    ckpt = save_tiny_janus(root / "Janus-Pro-tiny")
    (root / "prompts.txt").write_text("a red circle\na blue square left of a green triangle\n")
    (root / "plugins").mkdir()
    (root / "plugins" / "user_rewards.py").write_text(PLUGIN_SOURCE)
    (root / "base.yaml").write_text(f"output_dir: {root / 'unused'}\n")
    return root, ckpt


def _grpo(root, ckpt, out, *extra):
    sets = [f"output_dir={out}", f"policy.checkpoint={ckpt}", "rewards=[{name: 'user_rewards:redness'}]",
            f"data.train_prompts={root / 'prompts.txt'}", "rollout.num_workers=0", "grpo.num_generations=2",
            "grpo.per_device_train_batch_size=4", "grpo.learning_rate=0.01", "logging.report_to=[]",
            "logging.image_every=0", "logging.progress=false", "threads=1", *extra]
    assert main(["grpo", str(root / "base.yaml")] + [a for s in sets for a in ("--set", s)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sample_and_eval(janus, tmp_path):
    root, ckpt = janus
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(ckpt), "--prompts", str(root / "prompts.txt"), "--n", "2",
                 "--cfg", "5", "--out", str(out), "--seed", "0"]) == 0
    img = np.asarray(Image.open(out / "00001" / "samples" / "00001.png"))
    assert img.shape == (64, 64, 3)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"policy: {ckpt}\nprompts: shapes:heldout\nshapes_per_tag: 1\nsampling:\n  n: 2\n  cfg_scale: 5.0\n"
                   f"detector: shapes\ngrid_prompts: 1\noutput_dir: {tmp_path / 'eval'}\n")
    assert main(["eval", str(cfg)]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["n_images"] == 2 * result["n_prompts"] > 0


def test_grpo_cfg_rollouts_log_the_correction_and_save_a_janus_checkpoint(janus, tmp_path, monkeypatch):
    from transformers import JanusForConditionalGeneration

    root, ckpt = janus
    monkeypatch.syspath_prepend(str(root / "plugins"))
    rows = _grpo(root, ckpt, tmp_path / "grpo", "grpo.max_steps=3", "rollout.sampling.cfg_scale=5.0")
    assert len(rows) == 3
    ratio = [r["sampling/importance_sampling_ratio/mean"] for r in rows]
    assert all(np.isfinite(ratio)) and max(r["sampling/sampling_logp_difference/max"] for r in rows) > 0
    before = JanusForConditionalGeneration.from_pretrained(str(ckpt))
    after = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "grpo" / "final"))
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.state_dict()[name], after.state_dict()[name])  # full fine-tuning moved it
    assert torch.equal(before.state_dict()["model.vqmodel.decoder.conv_out.weight"],
                       after.state_dict()["model.vqmodel.decoder.conv_out.weight"])  # nothing trains the VQ-VAE


def test_grpo_without_cfg_is_on_policy_and_lora_moves_only_adapters(janus, tmp_path, monkeypatch):
    from argrpo.models.policy import load_policy

    root, ckpt = janus
    monkeypatch.syspath_prepend(str(root / "plugins"))
    rows = _grpo(root, ckpt, tmp_path / "lora", "grpo.max_steps=1", "correction.mode=always",
                 "policy.lora.enabled=true", "policy.lora.r=4")
    # step 0: the learner scores the sampler's own distribution (no CFG): TRL's importance ratio is 1
    assert rows[0]["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["sampling/importance_sampling_ratio/max"] == pytest.approx(1.0, abs=1e-3)
    tuned = load_policy(tmp_path / "lora" / "final")
    base = load_policy(ckpt).model.state_dict()
    lora_b = [v for k, v in tuned.model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # lora_B starts at zero
    merged = {k.replace(".base_layer", ""): v for k, v in tuned.model.get_base_model().state_dict().items()
              if "lora_" not in k}
    same = [k for k, v in base.items() if k in merged and torch.equal(v, merged[k])]
    assert len(same) == len(base)  # the base weights under the adapters are untouched


def test_vllm_engine_is_refused_before_anything_starts(janus, tmp_path, monkeypatch):
    root, ckpt = janus
    monkeypatch.syspath_prepend(str(root / "plugins"))
    with pytest.raises(ValueError, match="'janus' model family.*rollout.engine: torch"):
        _grpo(root, ckpt, tmp_path / "v", "grpo.max_steps=1", "rollout.engine=vllm")
    assert not (tmp_path / "v" / "metrics.jsonl").exists()


def test_sft_encodes_with_the_checkpoints_own_vqvae_and_saves_a_janus_checkpoint(janus, tmp_path):
    """`argrpo sft` with the shipped Janus-Pro SFT recipe on a Janus directory: no image tokenizer to name (the checkpoint's VQ-VAE encodes the data), the
    language model trains, the VQ-VAE does not, and the result loads back in transformers."""
    import datasets
    from argrpo.config import load_config
    from argrpo.data.captions import load_caption_dataset, load_images
    from argrpo.grpo.lm_stage import SFTConfig
    from argrpo.models.policy import load_policy
    from transformers import JanusForConditionalGeneration

    root, ckpt = janus
    out = tmp_path / "sft"
    sets = [f"output_dir={out}", f"policy.checkpoint={ckpt}", "data.kind=shapes", "data.shapes_n=16",
            f"cache_dir={tmp_path / 'cache'}", "caption_dropout=0.25", "train.max_steps=2", "train.batch_size=4",
            "train.gradient_accumulation_steps=1", "train.learning_rate=0.01", "train.report_to=[]",
            "train.bf16=false", "train.threads=1", "train.device=cpu", "train.save_steps=100"]
    assert main(["sft", str(RECIPES / "janus_pro" / "1b_sft.yaml")] + [a for s in sets for a in ("--set", s)]) == 0
    before = JanusForConditionalGeneration.from_pretrained(str(ckpt)).state_dict()
    after = JanusForConditionalGeneration.from_pretrained(str(out)).state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    assert not torch.equal(before["model.generation_head.vision_head.weight"],
                           after["model.generation_head.vision_head.weight"])
    vq = [k for k in before if k.startswith("model.vqmodel.")]
    assert vq and all(torch.equal(before[k], after[k]) for k in vq)
    assert json.loads((out / "argrpo.json").read_text())["family"] == "janus"

    # the cached codes are the checkpoint's own VQ-VAE codes of the rendered images
    pol = load_policy(ckpt)
    cache = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    cached = datasets.load_from_disk(str(cache[0]))
    cfg = load_config(SFTConfig, None, [f"policy.checkpoint={ckpt}", "data.kind=shapes", "data.shapes_n=16"])
    images = load_images(load_caption_dataset(cfg.data)[:2], pol.layout.image_size)
    codes = pol.family.image_decoder(pol.model).encode(images)
    assert torch.equal(codes.flatten(1), torch.as_tensor(cached[:2]["codes"]).long())


def test_caption_dropout_uses_the_janus_unconditional_prompt(janus):
    """A dropped row is the prompt CFG samples with: the same length, pad everywhere but BOS and <begin_of_image>."""
    import datasets
    from argrpo.grpo.lm_stage import CodesDataset
    from argrpo.models.policy import load_policy

    _, ckpt = janus
    pol = load_policy(ckpt)
    captions = ["a red circle", "two blue square left of a green triangle"] * 20
    cached = datasets.Dataset.from_dict({"caption": captions, "codes": [[0] * 16] * len(captions)})
    ds = CodesDataset(cached, pol.tokenizer, pol.family, caption_dropout=0.5, seed=0)
    bos, boi, pad = pol.tokenizer.bos_token_id, pol.tokenizer.convert_tokens_to_ids("<begin_of_image>"), \
        pol.tokenizer.pad_token_id
    dropped = [i for i in range(len(ds)) if ds.dropped[i]]
    kept = [i for i in range(len(ds)) if not ds.dropped[i]]
    assert dropped and kept
    for i in dropped:
        cond = pol.family.encode_prompts(pol.tokenizer, [captions[i]])[0]
        row = ds[i]["prompt_ids"]
        assert len(row) == len(cond) and row[0] == bos and row[-1] == boi and set(row[1:-1]) == {pad}
    for i in kept:
        assert ds[i]["prompt_ids"] == pol.family.encode_prompts(pol.tokenizer, [captions[i]])[0]
