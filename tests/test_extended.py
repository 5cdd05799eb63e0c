"""The generic ``extended`` family on a tiny random Gemma (Liquid's backbone: a plain causal LM whose vocabulary grows
by the codebook), described by a config: visual id range, grid, template, unconditional prompt, forced tokens and
image tokenizer. Nothing is downloaded: the Gemma, its word-level tokenizer and the VQ image tokenizer are built here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from argrpo.models.families import ExtendedFamily
from argrpo.models.families.extended import ExtendedSpec
from argrpo.models.policy import load_policy
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.types import SamplingParams

TEMPLATE = "<|t2i|> {caption} <|soi|>"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A Gemma directory as a user has it (config.json model_type gemma, no argrpo.json), a VQ image tokenizer
    directory, and the layout options that describe the checkpoint."""
    from argrpo.data.shapes import ShapesWorld
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import SHAPES_SPECIAL_TOKENS
    from argrpo.models.policy import round_vocab
    from argrpo.models.text_tokenizer import build_text_tokenizer
    from transformers import AutoModelForCausalLM, GemmaConfig

    root = tmp_path_factory.mktemp("gemma")
    world = ShapesWorld()
    _, images, _ = world.sample("train", 32, seed=0)
    vq = VQTokenizer.fit(images)
    vq.save_pretrained(root / "vq")
    tok = build_text_tokenizer(world.vocabulary(), special_tokens=SHAPES_SPECIAL_TOKENS)
    config = GemmaConfig(vocab_size=round_vocab(len(tok) + vq.codebook_size), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(root / "Gemma-tiny"))
    tok.save_pretrained(str(root / "Gemma-tiny"))
    options = {"visual_start": len(tok), "codebook_size": vq.codebook_size, "grid": list(vq.grid),
               "image_size": [64, 64], "prompt_template": TEMPLATE, "uncond_caption": "", "image_end": ["<|eoi|>"],
               "image_tokenizer": str(root / "vq")}
    return root, root / "Gemma-tiny", options


@pytest.fixture(scope="module")
def loaded(gemma):
    _, path, options = gemma
    return load_policy(path, layout="extended", layout_kwargs=options)


def test_a_config_describes_the_checkpoint(gemma, loaded):
    _, path, options = gemma
    fam, lay = loaded.family, loaded.layout
    assert isinstance(fam, ExtendedFamily) and type(loaded.model).__name__ == "GemmaForCausalLM"
    assert fam.direct and lay.visual_offset == options["visual_start"] and lay.grid == (8, 8)
    eoi = loaded.tokenizer.convert_tokens_to_ids("<|eoi|>")
    assert fam.forced_tokens == {64: eoi} and fam.completion_length == 65
    assert fam.encode_prompts(loaded.tokenizer, ["a red circle"]) == [
        loaded.tokenizer(TEMPLATE.format(caption="a red circle"), add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match="layout_options"):
        load_policy(path, layout="extended")


def _teacher_forced(loaded, prompts, completion, temperature):
    rows = [p + c for p, c in zip(prompts, completion.tolist())]
    ids = torch.tensor(rows)  # equal prompt lengths
    T = completion.shape[1]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[:, -T - 1:-1, loaded.layout.visual_slice].float()
    codes = (completion - loaded.layout.visual_offset).clamp(0, loaded.layout.codebook_size - 1)
    return torch.log_softmax(logits / temperature, -1).gather(-1, codes[..., None])[..., 0]


def test_engine_samples_codes_then_the_forced_end_token_and_decodes(loaded):
    fam = loaded.family
    prompts = fam.encode_prompts(loaded.tokenizer, ["a red circle"])
    engine = TorchEngine(loaded.model, loaded.layout, tokenizer=loaded.tokenizer, family=fam)
    roll = engine.generate(prompts, SamplingParams(n=3, temperature=0.8, seed=2))
    eoi = loaded.tokenizer.convert_tokens_to_ids("<|eoi|>")
    assert roll.completion_ids.shape == (3, 65) and bool((roll.completion_ids[:, -1] == eoi).all())
    assert bool(loaded.layout.is_visual(roll.completion_ids[:, :64]).all())
    ref = _teacher_forced(loaded, roll.prompt_ids, roll.completion_ids, 0.8)
    assert torch.allclose(roll.logprobs[:, :64], ref[:, :64], atol=1e-4) and bool((roll.logprobs[:, 64] == 0).all())
    images = loaded.image_decoder().decode(fam.completion_codes(roll.completion_ids))
    assert tuple(images.shape) == (3, 64, 64, 3)
    # CFG with the unconditional prompt the config names
    cfg = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, cfg_scale=3.0))
    assert int(cfg.completion_ids[0, -1]) == eoi


def test_mapped_codes_and_row_ends():
    """Codes named by tokens the tokenizer holds (interleaved with text ids) map through decoder_inputs and the
    head's rows; an end-of-row token follows every row."""
    from argrpo.models.layout import TokenLayout
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["[UNK]", "<pad>", "<eol>", *[f"<v{k}>" for k in range(8)], "a", "red", "circle"]
    names = names[:3] + names[3:][::-1]  # visual ids not in code order
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<pad>")
    spec = ExtendedSpec(visual_token_format="<v{code}>", row_end="<eol>")
    layout = ExtendedFamily.make_layout("toy", tok, 64, spec, 8, (2, 3), (4, 6))
    fam = ExtendedFamily.resolve(layout, tok, 64)
    assert not fam.contiguous and layout.visual_offset == 64
    ids = torch.tensor([[64 + 3, 2, 11]])
    assert fam.lm_input_ids(ids).tolist() == [[tok.convert_tokens_to_ids("<v3>"), 2, 11]]
    eol = tok.convert_tokens_to_ids("<eol>")
    assert fam.forced_tokens == {3: eol, 7: eol} and fam.completion_length == 8
    codes = torch.arange(6).reshape(1, 2, 3)
    completion = torch.tensor([[64, 65, 66, eol, 67, 68, 69, eol]])
    assert torch.equal(fam.completion_codes(completion), codes)
    again = ExtendedFamily(TokenLayout.from_dict(json.loads(json.dumps(fam.layout.to_dict()))))
    assert torch.equal(again.lm_ids, fam.lm_ids) and again.forced_tokens == fam.forced_tokens


def test_user_decoders_by_import_path_and_torchscript(gemma, loaded, tmp_path, monkeypatch):
    from argrpo.models.families.extended import load_user_decoder

    (tmp_path / "my_decoders.py").write_text(
        "import torch\n"
        "class Flat:\n"
        "    def __init__(self, layout):\n"
        "        self.codebook_size, self.grid = layout.codebook_size, layout.grid\n"
        "    def decode(self, codes):\n"
        "        return torch.zeros(codes.shape[0], 16, 16, 3, dtype=torch.uint8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dec = load_user_decoder("my_decoders:Flat", loaded.layout)
    assert tuple(dec.decode(torch.zeros(2, 8, 8, dtype=torch.long)).shape) == (2, 16, 16, 3)

    class Up(torch.nn.Module):
        def forward(self, codes):
            x = codes.float()[:, None].repeat(1, 3, 1, 1) / 100.0 - 1.0
            return torch.nn.functional.interpolate(x, scale_factor=8.0)

    torch.jit.script(Up()).save(str(tmp_path / "decoder.pt"))
    dec = load_user_decoder(str(tmp_path / "decoder.pt"), loaded.layout)
    img = dec.decode(torch.full((1, 8, 8), 100))
    assert tuple(img.shape) == (1, 64, 64, 3) and img.dtype == torch.uint8 and int(img.min()) == 128

    # a Hugging Face module class by import path, with its weights directory
    from emu3_fixtures import tiny_emu3

    model, _ = tiny_emu3()
    model.model.vqmodel.save_pretrained(str(tmp_path / "vqvae"))
    lay = ExtendedFamily.make_layout("vq", loaded.tokenizer, 192, ExtendedSpec(visual_start=200), 64, (3, 4), (6, 8))
    dec = load_user_decoder("transformers:Emu3VQVAE", lay, str(tmp_path / "vqvae"))
    codes = torch.randint(0, 64, (2, 3, 4))
    ref = model.model.vqmodel.decode(codes)
    assert torch.equal(dec.decode(codes), ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="image_decoder_weights"):
        load_user_decoder("transformers:Emu3VQVAE", lay)


def test_grpo_from_the_cli_on_gemma_then_the_saved_policy_loads_back(gemma, tmp_path, monkeypatch):
    import yaml
    from argrpo.recipes.cli import main
    from grpo_fixtures import PLUGIN_SOURCE

    root, path, options = gemma
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "user_rewards.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "grpo"
    cfg = {"output_dir": str(out), "threads": 1,
           "policy": {"checkpoint": str(path), "layout": "extended", "layout_options": options},
           "rewards": [{"name": "user_rewards:redness"}],
           "data": {"train_prompts": str(tmp_path / "prompts.txt")},
           "rollout": {"num_workers": 0},
           "grpo": {"num_generations": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01, "max_steps": 3},
           "logging": {"report_to": [], "image_every": 0, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["grpo", str(tmp_path / "run.yaml")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["completions/mean_length"] == 64  # the forced end token is not scored
    final = load_policy(out / "final")  # argrpo.json now describes it: no options needed
    assert isinstance(final.family, ExtendedFamily) and final.layout.grid == (8, 8)
    assert final.family.forced_tokens == load_policy(path, layout="extended",
                                                     layout_kwargs=options).family.forced_tokens
    before = load_policy(path, layout="extended", layout_kwargs=options).model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], final.model.state_dict()[name])
    assert np.isfinite(rows[-1]["loss"])
