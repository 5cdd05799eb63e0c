"""rollout.engines.torch_engine against an independent, straightforward reference sampler."""

from __future__ import annotations

import pytest
import torch
from argrpo.models.layout import TokenLayout
from argrpo.rollout.engines import ENGINES, get_engine
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.sampling import token_logprobs
from argrpo.rollout.types import SamplingParams
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

LAYOUT = TokenLayout(
    name="custom", text_vocab_size=40, visual_offset=40, codebook_size=32, grid=(3, 4), image_size=(12, 16),
    prompt_template="<t2i> {caption} <soi>", uncond_caption="",
)
VOCAB = 80  # 8 padding rows after the visual block: never sampled either
UNCOND = [1, 2]
PROMPTS = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 11, 12, 13, 14, 15, 16, 2]]  # different lengths -> left padding


def tiny_model(seed=0, dtype=torch.float32, arch="qwen2", tie=False, text_boost=0.0):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tie,
        initializer_range=0.1,
    )
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw)))
    model = model.to(dtype).eval()
    if text_boost:
        with torch.no_grad():  # make every non-visual id far likelier than any visual one
            w = model.get_output_embeddings().weight
            w[: LAYOUT.visual_offset] *= text_boost
            w[LAYOUT.visual_end :] *= text_boost
    return model


@torch.no_grad()
def reference_greedy(model, prompt, uncond, cfg):
    """Full-sequence recompute at every step, one sample at a time, a second pass for the uncond branch."""
    vs = LAYOUT.visual_slice
    cond_seq, unc_seq, out = list(prompt), list(uncond), []
    for _ in range(LAYOUT.n_image_tokens):
        lc = torch.log_softmax(model(torch.tensor([cond_seq])).logits[0, -1, vs].double(), -1)
        if cfg != 1.0:
            lu = torch.log_softmax(model(torch.tensor([unc_seq])).logits[0, -1, vs].double(), -1)
            lc = lu + cfg * (lc - lu)
        tok = int(lc.argmax()) + LAYOUT.visual_offset
        out.append(tok)
        cond_seq.append(tok)
        unc_seq.append(tok)
    return out


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_reference_with_left_padding(cfg, arch):
    model = tiny_model(seed=1, dtype=torch.float64, arch=arch)
    engine = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, cfg_scale=cfg, n=2))
    assert out.completion_ids.shape == (6, LAYOUT.n_image_tokens)
    for r in range(6):
        expected = reference_greedy(model, PROMPTS[r // 2], UNCOND, cfg)
        assert out.completion_ids[r].tolist() == expected, f"row {r}"
        assert out.prompt_ids[r] == PROMPTS[r // 2]


def test_cfg_changes_greedy_tokens():
    model = tiny_model(seed=1, dtype=torch.float64)
    engine = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND)
    a = engine.generate(PROMPTS, SamplingParams(temperature=0.0))
    b = engine.generate(PROMPTS, SamplingParams(temperature=0.0, cfg_scale=4.0))
    assert not torch.equal(a.completion_ids, b.completion_ids)


def test_only_visual_ids_over_many_seeds_and_weights():
    for w in range(3):
        engine = TorchEngine(tiny_model(seed=10 + w, text_boost=20.0), LAYOUT, uncond_prompt_ids=UNCOND)
        for s in range(4):
            sp = SamplingParams(temperature=[1.0, 1.5, 0.7, 0.0][s], cfg_scale=[1.0, 3.0][s % 2], top_k=[0, 5][w % 2],
                                top_p=[1.0, 0.9][s // 2], seed=1000 * w + s, n=4)
            out = engine.generate(PROMPTS, sp)
            ids = out.completion_ids
            assert ids.shape == (12, LAYOUT.n_image_tokens)
            assert bool(LAYOUT.is_visual(ids).all()), (w, s, ids)
            assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_policy_recompute(temperature):
    model = tiny_model(seed=2)
    engine = TorchEngine(model, LAYOUT)
    out = engine.generate(PROMPTS, SamplingParams(temperature=temperature, seed=5, n=2))
    N = LAYOUT.n_image_tokens
    worst = 0.0
    with torch.no_grad():
        for r in range(len(out)):
            seq = torch.tensor([out.prompt_ids[r] + out.completion_ids[r].tolist()])
            logits = model(seq).logits[:, -N - 1 : -1]  # position t predicts completion token t
            lp = token_logprobs(logits, out.completion_ids[r : r + 1], LAYOUT.visual_slice, temperature)[0]
            worst = max(worst, (lp - out.logprobs[r]).abs().max().item())
    assert worst < 1e-4, worst


def test_seeding_is_deterministic_and_batch_invariant():
    engine = TorchEngine(tiny_model(seed=3), LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=1.0, cfg_scale=2.0, seed=42, n=3)
    a = engine.generate(PROMPTS, sp)
    b = engine.generate(PROMPTS, sp)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    c = engine.generate(PROMPTS, sp.with_(seed=43))
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of one prompt differ from each other
    assert len({tuple(r) for r in a.completion_ids[:3].tolist()}) == 3
    # chunked, or only the last prompt with the seed shifted to its first row: the same samples
    chunked = TorchEngine(engine.model, LAYOUT, uncond_prompt_ids=UNCOND, max_batch_rows=4).generate(PROMPTS, sp)
    assert torch.equal(a.completion_ids, chunked.completion_ids)
    torch.testing.assert_close(a.logprobs, chunked.logprobs, atol=1e-5, rtol=0)
    last = engine.generate(PROMPTS[2:], sp.with_(seed=42 + 6))
    assert torch.equal(a.completion_ids[6:], last.completion_ids)


def test_visual_head_equals_full_head():
    model = tiny_model(seed=4, tie=True)
    sp = SamplingParams(temperature=0.9, cfg_scale=2.0, top_k=8, seed=1, n=2)
    a = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND).generate(PROMPTS, sp)
    b = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND, visual_head=False).generate(PROMPTS, sp)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert model.config._attn_implementation == "sdpa"  # the decode-loop attention switch is undone
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_eager_attention_matches_sdpa():
    sdpa = tiny_model(seed=4)
    eager = tiny_model(seed=4)
    eager.config._attn_implementation = "eager"  # the engine's ready-made 4D mask must suit both kernels
    sp = SamplingParams(temperature=1.0, cfg_scale=2.0, seed=3, n=2)
    a = TorchEngine(sdpa, LAYOUT, uncond_prompt_ids=UNCOND).generate(PROMPTS, sp)
    b = TorchEngine(eager, LAYOUT, uncond_prompt_ids=UNCOND).generate(PROMPTS, sp)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_load_full_weights_changes_outputs_and_version():
    engine = TorchEngine(tiny_model(seed=5, tie=True), LAYOUT)
    sp = SamplingParams(temperature=1.0, seed=0, n=2)
    before = engine.generate(PROMPTS, sp)
    new = {k: v for k, v in tiny_model(seed=6, tie=True).state_dict().items() if k != "lm_head.weight"}
    engine.load_weights(new, version=7)
    after = engine.generate(PROMPTS, sp)
    assert engine.weight_version == 7 and after.weight_version == 7 and before.weight_version == 0
    assert not torch.equal(before.completion_ids, after.completion_ids)
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({**new, "nope.weight": torch.zeros(1)}, version=8)
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({k: v for k, v in new.items() if "layers.0." not in k}, version=8)
    with pytest.raises(ValueError, match="PeftModel"):
        engine.load_weights({}, version=8, adapter=True)


def test_load_lora_adapter_changes_outputs():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    engine = TorchEngine(get_peft_model(tiny_model(seed=7), cfg), LAYOUT)
    sp = SamplingParams(temperature=0.0, n=1)
    before = engine.generate(PROMPTS, sp)
    trained = get_peft_model(tiny_model(seed=7), cfg)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a LoRA B of zero is a no-op; a trained one is not
    adapter = get_peft_model_state_dict(trained)
    assert adapter and all("lora_" in k for k in adapter)
    engine.load_weights(adapter, version=3, adapter=True)
    after = engine.generate(PROMPTS, sp)
    assert after.weight_version == 3
    assert not torch.equal(before.completion_ids, after.completion_ids)
    # the same adapter merged into a plain model samples the same tokens
    merged = TorchEngine(trained.merge_and_unload(), LAYOUT).generate(PROMPTS, sp)
    assert torch.equal(after.completion_ids, merged.completion_ids)


def test_errors_are_clear():
    engine = TorchEngine(tiny_model(seed=8), LAYOUT)
    with pytest.raises(ValueError, match="unconditional prompt"):
        engine.generate(PROMPTS, SamplingParams(cfg_scale=2.0))
    with pytest.raises(ValueError, match="prompt 1 has ids outside"):
        engine.generate([[1, 2], [1, 500]], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        TorchEngine(tiny_model(seed=8), TokenLayout(
            name="custom", text_vocab_size=70, visual_offset=70, codebook_size=32, grid=(2, 2), image_size=(8, 8)))


def test_registry_and_tokenizer_uncond_prompt():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<t2i>", "<soi>", "a", "red", "circle", "blue", "square"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    assert get_engine("torch") is TorchEngine and ENGINES["torch"] is TorchEngine
    with pytest.raises(KeyError, match="unknown rollout engine"):
        get_engine("nope")
    model = tiny_model(seed=9, dtype=torch.float64)
    engine = TorchEngine(model, LAYOUT, tokenizer=tokenizer)
    from argrpo.rollout.engines import encode_prompts

    prompts = encode_prompts(tokenizer, LAYOUT, ["a red circle", "blue square"])
    assert prompts == [[1, 3, 4, 5, 2], [1, 6, 7, 2]]
    out = engine.generate(prompts, SamplingParams(temperature=0.0, cfg_scale=2.0))
    assert out.completion_ids[0].tolist() == reference_greedy(model, prompts[0], [1, 2], 2.0)
    neg = engine.generate(prompts, SamplingParams(temperature=0.0, cfg_scale=2.0, negative_prompt="blue square"))
    assert neg.completion_ids[0].tolist() == reference_greedy(model, prompts[0], [1, 6, 7, 2], 2.0)


@pytest.mark.gpu
def test_gpu_matches_cpu_greedy():
    model = tiny_model(seed=1, dtype=torch.float64)
    sp = SamplingParams(temperature=0.0, cfg_scale=3.0, n=2)
    cpu = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND).generate(PROMPTS, sp)
    gpu = TorchEngine(tiny_model(seed=1, dtype=torch.float64), LAYOUT, device="cuda", uncond_prompt_ids=UNCOND)
    out = gpu.generate(PROMPTS, sp)
    assert torch.equal(cpu.completion_ids, out.completion_ids)
    s = gpu.generate(PROMPTS, sp.with_(temperature=1.0, seed=3))
    assert bool(LAYOUT.is_visual(s.completion_ids).all())
    assert torch.equal(s.completion_ids, gpu.generate(PROMPTS, sp.with_(temperature=1.0, seed=3)).completion_ids)
