"""bench.conditioning's per-image likelihood: the same numbers as the training loss, one row at a time."""

from types import SimpleNamespace

import torch
from argrpo.data.shapes import ShapesWorld
from argrpo.grpo.lm_stage import CodesCollator, visual_lm_loss
from argrpo.models.layout import layout_preset
from argrpo.models.policy import build_policy
from argrpo.models.text_tokenizer import build_text_tokenizer
from argrpo.rollout.engines import encode_prompts

from bench.conditioning import image_nats


def test_image_nats_is_the_per_row_training_loss_summed_over_tokens():
    special = layout_preset("shapes", text_vocab_size=0, codebook_size=16).special_tokens
    tok = build_text_tokenizer(ShapesWorld().vocabulary(), special_tokens=special)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=16)
    model = build_policy(layout, size="tiny", seed=0).eval()
    policy = SimpleNamespace(model=model, layout=layout, tokenizer=tok)
    captions = ["a photo of a red circle", "a photo of two squares", "", "a photo of a triangle left of a circle"]
    codes = torch.randint(0, 16, (4, layout.n_image_tokens), generator=torch.Generator().manual_seed(0))

    got = image_nats(policy, codes, captions, batch=3)  # two batches, with different prompt padding

    ids = encode_prompts(tok, layout, captions)
    for i in range(4):
        one = CodesCollator(layout, tok.pad_token_id)([{"prompt_ids": ids[i], "codes": codes[i]}])
        with torch.no_grad():
            want = float(visual_lm_loss(model, one, layout)[0]) * layout.n_image_tokens
        assert abs(got[i] - want) < 1e-3 * max(1.0, abs(want)), (i, got[i], want)
    assert len(set(round(float(x), 3) for x in got)) > 1  # the captions matter to the model
