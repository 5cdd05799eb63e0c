"""Emu3's forced tokens in the learner, and `argrpo grpo` on a tiny Emu3 checkpoint from the CLI.

Forced tokens (row ends, EOF, EOI, EOS) are placed by the engine, so they carry no log-prob, no KL and no loss:
the learner's visual head scores them 0, TRL's loss mask (env_mask) leaves them out, and nothing about a forced
token's logit can change a gradient.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from argrpo.models.policy import load_policy
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.types import SamplingParams
from emu3_fixtures import save_tiny_emu3

GRID = (3, 4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Emu3 as shipped, then saved by argrpo at a 3 x 4 grid (argrpo.json keeps the grid)."""
    root = tmp_path_factory.mktemp("emu3_grpo")
    shipped = save_tiny_emu3(root / "Emu3-tiny")
    pol = load_policy(shipped, layout_kwargs={"grid": list(GRID)})
    return root, pol.family.save(root / "policy", pol.model, pol.tokenizer)


def _scored(pol, roll, head_rows_delta=None):
    """The patched forward's (log_probs, entropy) [B, T] of a rollout, and the parameter gradients of a
    REINFORCE-style loss on them; ``head_rows_delta`` is added to the LM head rows of the forced tokens first."""
    from argrpo.grpo.logprobs import install_visual_head

    model = pol.model
    if head_rows_delta is not None:
        with torch.no_grad():
            rows = sorted(set(pol.family.forced_tokens.values()))
            model.lm_head.weight[rows] += head_rows_delta
    if getattr(model, "_argrpo_visual_head", None) is None:
        install_visual_head(model, pol.family, 1.0)
    ids = torch.cat([torch.tensor(roll.prompt_ids), roll.completion_ids], 1)
    labels = ids.clone()
    labels[:, : len(roll.prompt_ids[0])] = -100
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    T = roll.completion_ids.shape[1]
    lp, ent = out.log_probs[:, -T:], out.entropy[:, -T:]
    (-(lp * torch.tensor([1.0, -0.5])[:, None]).sum() - 0.01 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


def test_forced_tokens_carry_no_logprob_and_no_gradient(saved):
    _, path = saved
    pol = load_policy(path)
    fam = pol.family
    prompts = fam.encode_prompts(pol.tokenizer, ["a red circle"])
    roll = TorchEngine(pol.model, pol.layout, tokenizer=pol.tokenizer, family=fam).generate(
        prompts, SamplingParams(n=2, temperature=1.0, seed=5))
    pol.model.train()
    lp, ent, grads = _scored(pol, roll)
    forced = ~fam.sampled_mask()
    assert forced.sum() == GRID[0] + 3
    assert bool((lp[:, forced] == 0).all()) and bool((ent[:, forced] == 0).all())
    # sampled positions: the learner scores the sampler's distribution (importance ratio 1)
    assert torch.allclose(lp[:, ~forced], roll.logprobs[:, ~forced], atol=1e-4)
    assert bool((roll.logprobs[:, forced] == 0).all())
    # changing the forced tokens' logits (their LM head rows) changes no gradient
    lp2, ent2, grads2 = _scored(pol, roll, head_rows_delta=torch.randn(len(set(fam.forced_tokens.values())),
                                                                        pol.model.lm_head.weight.shape[1]) * 3)
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[k], grads2[k]) for k in grads)
    assert float(grads["lm_head.weight"][sorted(set(fam.forced_tokens.values()))].abs().sum()) == 0.0


def test_rollout_source_masks_forced_tokens_for_trl(saved):
    from types import SimpleNamespace

    from argrpo.grpo.rollouts import RolloutSource
    from argrpo.rollout.types import Rollout

    _, path = saved
    pol = load_policy(path)
    fam = pol.family
    T = fam.completion_length

    class Pool:
        def generate_async(self, prompts, n, sampling):
            from argrpo.rollout.pool import RolloutFuture

            B = len(prompts) * n
            roll = Rollout([[1]] * B, torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T),
                           images=np.zeros((B, 6, 8, 3), np.uint8))
            return RolloutFuture(lambda: roll, lambda: True)

    class Sync:
        def take_seconds(self):
            return 0.0

        def ensure(self, model, version):
            return False

    src = RolloutSource(Pool(), Sync(), SamplingParams(), 2, ["a", "b"], 1)
    trainer = SimpleNamespace(model=None, state=SimpleNamespace(global_step=0), family=fam)
    out = src(["a", "a"], trainer)
    assert out["env_mask"] == [fam.sampled_mask().int().tolist()] * 2
    assert sum(out["env_mask"][0]) == GRID[0] * GRID[1]


def test_grpo_from_the_cli_runs_three_steps_and_saves_an_emu3_checkpoint(saved, tmp_path, monkeypatch):
    from argrpo.recipes.cli import main
    from grpo_fixtures import PLUGIN_SOURCE
    from transformers import Emu3ForConditionalGeneration

    root, path = saved
    (root / "prompts.txt").write_text("a red circle\na blue square left of a green triangle\n")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "user_rewards.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(plugins))
    (tmp_path / "base.yaml").write_text(f"output_dir: {tmp_path / 'unused'}\n")
    out = tmp_path / "grpo"
    sets = [f"output_dir={out}", f"policy.checkpoint={path}", "rewards=[{name: 'user_rewards:redness'}]",
            f"data.train_prompts={root / 'prompts.txt'}", "rollout.num_workers=0", "grpo.num_generations=2",
            "grpo.per_device_train_batch_size=4", "grpo.learning_rate=0.01", "grpo.max_steps=3", "grpo.beta=0.04",
            "rollout.sampling.cfg_scale=3.0", "rollout.sampling.negative_prompt='lowres blurry'",
            "logging.report_to=[]", "logging.image_every=0", "logging.progress=false", "threads=1"]
    assert main(["grpo", str(tmp_path / "base.yaml")] + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    # TRL counted only the sampled codes (env_mask), not the forced row ends
    assert rows[0]["completions/mean_length"] == GRID[0] * GRID[1]
    assert all(np.isfinite(r["sampling/importance_sampling_ratio/mean"]) for r in rows)
    assert all(np.isfinite(r["kl"]) for r in rows)
    before = Emu3ForConditionalGeneration.from_pretrained(str(path))
    after = Emu3ForConditionalGeneration.from_pretrained(str(out / "final"))
    name = "model.text_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.state_dict()[name], after.state_dict()[name])
    final = load_policy(out / "final")
    assert final.layout.grid == GRID and final.family.forced_tokens == load_policy(path).family.forced_tokens


def test_pretrain_sft_loss_scores_codes_only_with_forced_tokens_in_the_input(saved):
    """The LM stage's batch holds the row ends where Emu3 expects them; the loss is the codes' cross-entropy over
    the visual tokens, read from transformers' own full logits at the sampled positions."""
    from argrpo.grpo.lm_stage import CodesCollator, visual_lm_loss

    _, path = saved
    pol = load_policy(path)
    fam, tok = pol.family, pol.tokenizer
    prompts = fam.encode_prompts(tok, ["a red circle", "two blue square"])
    codes = torch.randint(0, pol.layout.codebook_size, (2, pol.layout.n_image_tokens), generator=torch.Generator()
                          .manual_seed(0))
    batch = CodesCollator(fam, tok.pad_token_id)([{"prompt_ids": p, "codes": c} for p, c in zip(prompts, codes)])
    T = fam.completion_length
    image = batch["input_ids"][:, -T:]
    assert torch.equal(fam.completion_codes(image), codes.reshape(2, *GRID))
    assert all(bool((image[:, p] == t).all()) for p, t in fam.forced_tokens.items())
    loss, _ = visual_lm_loss(pol.model, batch, fam)
    with torch.no_grad():
        logits = pol.model(input_ids=fam.to_lm_ids(batch["input_ids"]), attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits[:, -T - 1:-1][:, fam.sampled_mask()]
    visual = torch.tensor(pol.model.vocabulary_mapping.image_tokens)
    ref = torch.nn.functional.cross_entropy(logits[..., visual].flatten(0, 1).float(), codes.flatten())
    assert torch.allclose(loss, ref, atol=1e-5)


def test_sft_from_the_cli_encodes_with_the_checkpoints_own_vqvae(saved, tmp_path):
    """`argrpo sft` on an Emu3 checkpoint: its VQ-VAE encodes the rendered images into the 3 x 4 grid, the text
    model trains (codes only in the loss; row ends are inputs), and the result loads back in transformers."""
    from argrpo.recipes.cli import main
    from PIL import Image
    from transformers import Emu3ForConditionalGeneration

    _, path = saved
    pol = load_policy(path)
    images = torch.randint(0, 256, (2, *pol.layout.image_size, 3), dtype=torch.uint8)
    codes = pol.family.image_decoder(pol.model).encode(images)
    assert codes.shape == (2, *GRID) and int(codes.max()) < pol.layout.codebook_size
    folder = tmp_path / "images"  # an image folder with .txt captions, at another size (the loader resizes)
    folder.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square", "two green triangle", "a red square"] * 2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    (tmp_path / "base.yaml").write_text(f"output_dir: {tmp_path / 'unused'}\n")
    out = tmp_path / "sft"
    sets = [f"output_dir={out}", f"policy.checkpoint={path}", "data.kind=imagefolder", f"data.path={folder}",
            f"cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.batch_size=4", "train.learning_rate=0.01",
            "train.report_to=[]", "train.bf16=false", "train.threads=1", "train.save_steps=100"]
    assert main(["sft", str(tmp_path / "base.yaml")] + [a for s in sets for a in ("--set", s)]) == 0
    before = Emu3ForConditionalGeneration.from_pretrained(str(path)).state_dict()
    after = Emu3ForConditionalGeneration.from_pretrained(str(out)).state_dict()
    name = "model.text_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.vqmodel."))
    assert load_policy(out).layout.grid == GRID
