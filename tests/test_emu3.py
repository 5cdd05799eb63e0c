"""Emu3 through the model-family seam, on tiny random-weight instances of transformers' own Emu3 classes.

The reference generation is transformers' ``generate`` with the constraint function of its Emu3 documentation
(``prefix_allowed_tokens_fn``: visual tokens, an end-of-row token after each row, then EOF / EOI / EOS) and CFG with
a negative prompt (``negative_prompt_ids`` + ``guidance_scale``).
"""

from __future__ import annotations

import pytest
import torch
from argrpo.models.families import Emu3Family, check_engine, detect_family
from argrpo.models.policy import load_policy
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.types import SamplingParams
from emu3_fixtures import save_tiny_emu3

CAPTIONS = ["a red circle", "two blue square left of a green triangle"]
GRID = (4, 5)  # h != w, so a row/column mix-up cannot pass


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return save_tiny_emu3(tmp_path_factory.mktemp("emu3") / "ckpt")


@pytest.fixture(scope="module")
def loaded(emu3_dir):
    return load_policy(emu3_dir, layout_kwargs={"grid": list(GRID), "uncond_caption": "lowres blurry"})


def _engine(loaded):
    return TorchEngine(loaded.model, loaded.layout, tokenizer=loaded.tokenizer, family=loaded.family)


def _documented_constraint(tokenizer, visual_tokens, height, width):
    """prefix_allowed_tokens_fn as transformers' Emu3 documentation writes it (model_doc/emu3.md)."""
    def prefix_allowed_tokens_fn(batch_id, input_ids):
        image_wrapper_token_id = torch.tensor([tokenizer.image_wrapper_token_id])
        eoi_token_id = torch.tensor([tokenizer.eoi_token_id])
        eos_token_id = torch.tensor([tokenizer.eos_token_id])
        pad_token_id = torch.tensor([tokenizer.pad_token_id])
        eof_token_id = torch.tensor([tokenizer.eof_token_id])
        eol_token_id = tokenizer.encode("<|extra_200|>", return_tensors="pt")[0]

        position = torch.nonzero(input_ids == image_wrapper_token_id, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (eol_token_id,)
        elif offset == (width + 1) * height + 1:
            return (eof_token_id,)
        elif offset == (width + 1) * height + 2:
            return (eoi_token_id,)
        elif offset == (width + 1) * height + 3:
            return (eos_token_id,)
        elif offset > (width + 1) * height + 3:
            return (pad_token_id,)
        else:
            return visual_tokens

    return prefix_allowed_tokens_fn


def _left_pad(rows, pad):
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    return ids, mask


def test_detected_from_config_and_loaded_as_shipped(emu3_dir, loaded):
    assert detect_family(emu3_dir) is Emu3Family and isinstance(loaded.family, Emu3Family)
    lay, fam = loaded.layout, loaded.family
    h, w = GRID
    assert lay.grid == GRID and lay.codebook_size == 64 and lay.image_size == (2 * h, 2 * w)
    assert fam.completion_length == h * (w + 1) + 3
    tok = loaded.tokenizer
    eol = tok.convert_tokens_to_ids("<|extra_200|>")
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|extra_201|>", "<|image end|>", "<|extra_204|>")]
    assert fam.forced_tokens == {**{r * (w + 1) + w: eol for r in range(h)},
                                 **{h * (w + 1) + i: t for i, t in enumerate(ends)}}
    with pytest.raises(ValueError, match="'emu3' model family.*rollout.engine: torch"):
        check_engine(fam, "vllm")


def test_prompt_is_the_processors_generation_prompt(loaded):
    from transformers import Emu3ImageProcessor, Emu3Processor

    tok, fam = loaded.tokenizer, loaded.family
    proc = Emu3Processor(Emu3ImageProcessor(), tok)
    h, w = GRID
    # the processor derives the grid from ratio and area: an h:w ratio at (2h x 2w) pixels x 4 = 8 px per code
    ref = proc(text=CAPTIONS, return_for_image_generation=True, ratio=f"{w}:{h}", image_area=h * w * 64)
    assert ref["image_sizes"][0] == [h, w]
    want = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(ref["input_ids"], ref["attention_mask"])]
    assert fam.encode_prompts(tok, CAPTIONS) == want
    unc = fam.uncond_prompt_ids(tok, want[0])
    assert unc == fam.encode_prompts(tok, ["lowres blurry"])[0]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_cfg_tokens_equal_transformers_generate_with_the_documented_constraint(loaded, scale):
    fam, tok, model = loaded.family, loaded.tokenizer, loaded.model
    h, w = GRID
    prompts = fam.encode_prompts(tok, CAPTIONS)  # different lengths: left padding on the conditional side
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    neg = torch.tensor([fam.uncond_prompt_ids(tok, p) for p in prompts])
    T = fam.completion_length
    fn = _documented_constraint(tok, model.vocabulary_mapping.image_tokens, h, w)
    kw = {"negative_prompt_ids": neg, "negative_prompt_attention_mask": torch.ones_like(neg),
          "guidance_scale": scale} if scale != 1.0 else {}
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                         prefix_allowed_tokens_fn=fn, **kw)[:, ids.shape[1]:]
    roll = _engine(loaded).generate(prompts, SamplingParams(n=1, temperature=0.0, cfg_scale=scale))
    got = fam.to_lm_ids(roll.completion_ids)
    assert got.shape == ref.shape == (2, T)
    assert torch.equal(got, ref)  # row ends, EOF, EOI and EOS included
    # the sampler reports no log-prob for forced tokens
    forced = ~fam.sampled_mask()
    assert bool((roll.logprobs[:, forced] == 0).all()) and bool((roll.logprobs[:, ~forced] < 0).all())
    # and transformers' own decoder reads the same completion
    pixels = model.decode_image_tokens(image_tokens=ref, height=h, width=w)
    assert pixels.shape == (2, 3, 2 * h, 2 * w)


def _teacher_forced(loaded, prompts, completion, temperature):
    """Log-probs [B, T] of completion (argrpo ids) recomputed in one forward, over the visual tokens' lm_head rows."""
    fam, model = loaded.family, loaded.model
    rows = [p + c for p, c in zip(prompts, fam.to_lm_ids(completion).tolist())]
    ids, mask = _left_pad(rows, loaded.tokenizer.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    T = completion.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -T - 1:-1]
    visual = torch.tensor(model.vocabulary_mapping.image_tokens)
    logp = torch.log_softmax(logits[..., visual].float() / temperature, -1)
    codes = (completion - loaded.layout.visual_offset).clamp(min=0)
    return logp.gather(-1, codes[..., None])[..., 0]


def test_sampler_logprobs_equal_teacher_forced_recompute(loaded):
    fam = loaded.family
    prompts = fam.encode_prompts(loaded.tokenizer, CAPTIONS)
    roll = _engine(loaded).generate(prompts, SamplingParams(n=3, temperature=0.9, seed=7))
    sampled = fam.sampled_mask()
    assert roll.completion_ids.shape == (6, fam.completion_length)
    assert bool(loaded.layout.is_visual(roll.completion_ids[:, sampled]).all())
    ref = _teacher_forced(loaded, [p for p in prompts for _ in range(3)], roll.completion_ids, 0.9)
    assert torch.allclose(roll.logprobs[:, sampled], ref[:, sampled], atol=1e-4)


def test_decode_gives_images_of_the_configured_size(loaded):
    fam = loaded.family
    prompts = fam.encode_prompts(loaded.tokenizer, CAPTIONS)
    roll = _engine(loaded).generate(prompts, SamplingParams(n=1, temperature=1.0, seed=1))
    codes = fam.completion_codes(roll.completion_ids)
    assert codes.shape == (2, *GRID)
    images = loaded.image_decoder().decode(codes)
    assert images.shape == (2, 2 * GRID[0], 2 * GRID[1], 3) and images.dtype == torch.uint8
    # the same pixels as transformers' decode_image_tokens on Emu3's own ids
    ref = loaded.model.decode_image_tokens(image_tokens=fam.to_lm_ids(roll.completion_ids), height=GRID[0],
                                           width=GRID[1])
    assert torch.equal(images, ((ref.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))


def test_save_then_transformers_from_pretrained_gives_equal_logits(loaded, tmp_path):
    from transformers import Emu3ForConditionalGeneration

    out = loaded.family.save(tmp_path / "saved", loaded.model, loaded.tokenizer)
    again = Emu3ForConditionalGeneration.from_pretrained(str(out)).eval()
    ids = torch.tensor(loaded.family.encode_prompts(loaded.tokenizer, CAPTIONS[:1]))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, again(input_ids=ids).logits)
    back = load_policy(out)  # argrpo.json keeps the grid and the negative prompt
    assert isinstance(back.family, Emu3Family) and back.layout == loaded.layout
    assert back.family.forced_tokens == loaded.family.forced_tokens


def test_lora_adapts_the_language_model_only(loaded):
    from argrpo.models.policy import apply_lora
    from emu3_fixtures import tiny_emu3

    model, _tok = tiny_emu3(seed=1)
    lora = apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"), family=loaded.family)
    adapted = {n.split(".lora_")[0] for n, _ in lora.named_parameters() if "lora_" in n}
    assert adapted and all("text_model" in n for n in adapted)
