"""rollout.engines.jacobi: speculative Jacobi decoding against plain sampling and the exact joint distribution."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from argrpo.models.layout import TokenLayout
from argrpo.rollout.engines.jacobi import JacobiStats, jacobi_generate
from argrpo.rollout.engines.torch_engine import TorchEngine
from argrpo.rollout.sampling import final_logprobs, token_logprobs
from argrpo.rollout.types import SamplingParams
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

LAYOUT = TokenLayout(
    name="custom", text_vocab_size=40, visual_offset=40, codebook_size=32, grid=(3, 4), image_size=(12, 16),
    prompt_template="<t2i> {caption} <soi>", uncond_caption="",
)
UNCOND = [1, 2]
PROMPTS = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 11, 12, 13, 14, 15, 16, 2]]  # different lengths -> left padding

# the distribution tests: 3 codes x 4 positions (a 2 x 2 grid, so the "code above" prior is used) = 81 possible
# images, so the joint can be enumerated exactly
SMALL = TokenLayout(
    name="custom", text_vocab_size=20, visual_offset=20, codebook_size=3, grid=(2, 2), image_size=(8, 8),
    prompt_template="{caption}",
)
SMALL_PROMPTS = [[1, 5, 6, 2], [1, 9, 2]]


def tiny_model(seed=0, dtype=torch.float32, arch="qwen2", vocab=80, init=0.1, text_boost=0.0, layout=LAYOUT):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=init,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    model = model.to(dtype).eval()
    if text_boost:
        with torch.no_grad():  # every non-visual id far likelier than any visual one
            w = model.get_output_embeddings().weight
            w[: layout.visual_offset] *= text_boost
            w[layout.visual_end :] *= text_boost
    return model


# ---- greedy: Jacobi fixed-point iteration == plain greedy ----------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_equals_plain_greedy(cfg, arch):
    engine = TorchEngine(tiny_model(seed=1, dtype=torch.float64, arch=arch), LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=0.0, cfg_scale=cfg, n=2)
    plain = engine.generate(PROMPTS, sp)
    for window in (1, 3, 16):
        stats = JacobiStats(window)
        out = jacobi_generate(engine, PROMPTS, sp, window=window, stats=stats)
        assert torch.equal(out.completion_ids, plain.completion_ids), window
        torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-9, rtol=0)
        assert out.prompt_ids == plain.prompt_ids
        assert stats.forward_steps <= LAYOUT.n_image_tokens and stats.plain_steps == LAYOUT.n_image_tokens
        assert sum(stats.tokens_per_pass) == sum(stats.row_steps)


def test_greedy_chunked_equals_plain_greedy():
    engine = TorchEngine(tiny_model(seed=2, dtype=torch.float64), LAYOUT, uncond_prompt_ids=UNCOND, max_batch_rows=4)
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0, n=3)
    stats = JacobiStats(8)
    out = jacobi_generate(engine, PROMPTS, sp, window=8, stats=stats)
    assert torch.equal(out.completion_ids, engine.generate(PROMPTS, sp).completion_ids)
    assert stats.plain_steps == 3 * LAYOUT.n_image_tokens  # 9 rows in chunks of 4
    assert len(stats.row_steps) == 9


def test_near_uniform_model_accepts_whole_windows():
    # p is nearly the same uniform distribution at every position, so drafts from p (no neighbour prior, which
    # would concentrate the proposal) pass min(1, p/q) almost surely
    engine = TorchEngine(tiny_model(seed=2, init=1e-4), LAYOUT, uncond_prompt_ids=UNCOND)
    stats = JacobiStats(5)
    jacobi_generate(engine, PROMPTS, SamplingParams(temperature=1.0, cfg_scale=2.0, seed=0, n=4), window=5,
                    stats=stats, copy_left=0.0, copy_up=0.0)
    # 12 tokens, at most 6 per pass: 2 passes when everything is accepted
    assert stats.forward_steps == 2 and stats.step_ratio == 6.0, stats.summary()
    assert stats.tokens_per_pass[6] == 2 * 12 and min(stats.acceptance) > 0.99


# ---- sampling -----------------------------------------------------------------------------------------------------
def test_only_visual_ids():
    for w in range(2):
        engine = TorchEngine(tiny_model(seed=10 + w, text_boost=20.0), LAYOUT, uncond_prompt_ids=UNCOND)
        for s in range(4):
            sp = SamplingParams(temperature=[1.0, 1.5, 0.7, 0.0][s], cfg_scale=[1.0, 3.0][s % 2], top_k=[0, 5][w],
                                top_p=[1.0, 0.9][s // 2], seed=100 * w + s, n=4)
            out = jacobi_generate(engine, PROMPTS, sp, window=[2, 5][w], init=["last", "uniform"][s % 2])
            assert out.completion_ids.shape == (12, LAYOUT.n_image_tokens)
            assert bool(LAYOUT.is_visual(out.completion_ids).all()), (w, s)
            assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_recompute(temperature):
    model = tiny_model(seed=3)
    engine = TorchEngine(model, LAYOUT)
    out = jacobi_generate(engine, PROMPTS, SamplingParams(temperature=temperature, seed=5, n=3), window=4)
    N = LAYOUT.n_image_tokens
    with torch.no_grad():
        for r in range(len(out)):
            seq = torch.tensor([out.prompt_ids[r] + out.completion_ids[r].tolist()])
            logits = model(seq).logits[:, -N - 1 : -1]  # position t predicts completion token t
            lp = token_logprobs(logits, out.completion_ids[r : r + 1], LAYOUT.visual_slice, temperature)[0]
            assert (lp - out.logprobs[r]).abs().max().item() < 1e-4, r


def test_sampler_logprobs_with_cfg_and_top_k_equal_the_final_distribution():
    model = tiny_model(seed=4, dtype=torch.float64)
    engine = TorchEngine(model, LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=0.8, cfg_scale=2.5, top_k=6, seed=9, n=2)
    out = jacobi_generate(engine, PROMPTS, sp, window=3)
    N, vs = LAYOUT.n_image_tokens, LAYOUT.visual_slice
    with torch.no_grad():
        for r in range(len(out)):
            ids = out.completion_ids[r].tolist()
            lc = model(torch.tensor([out.prompt_ids[r] + ids])).logits[0, -N - 1 : -1]
            lu = model(torch.tensor([UNCOND + ids])).logits[0, -N - 1 : -1]
            expected = final_logprobs(lc, lu, sp, vs).gather(-1, (out.completion_ids[r] - vs.start)[:, None])[:, 0]
            torch.testing.assert_close(out.logprobs[r], expected.float(), atol=1e-5, rtol=0)


def test_seeded_deterministic_and_batch_invariant():
    engine = TorchEngine(tiny_model(seed=5, dtype=torch.float64), LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=1.0, cfg_scale=2.0, seed=42, n=3)
    a = jacobi_generate(engine, PROMPTS, sp, window=4)
    b = jacobi_generate(engine, PROMPTS, sp, window=4)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, jacobi_generate(engine, PROMPTS, sp.with_(seed=43), window=4).completion_ids)
    chunked = TorchEngine(engine.model, LAYOUT, uncond_prompt_ids=UNCOND, max_batch_rows=2)
    assert torch.equal(a.completion_ids, jacobi_generate(chunked, PROMPTS, sp, window=4).completion_ids)
    last = jacobi_generate(engine, PROMPTS[2:], sp.with_(seed=42 + 6), window=4)
    assert torch.equal(a.completion_ids[6:], last.completion_ids)
    assert a.timings["jacobi_forward_steps"] >= 1 and a.timings["jacobi_plain_steps"] == LAYOUT.n_image_tokens


def test_bad_options_are_errors():
    engine = TorchEngine(tiny_model(seed=6), LAYOUT)
    with pytest.raises(ValueError, match="window"):
        jacobi_generate(engine, PROMPTS, SamplingParams(), window=0)
    with pytest.raises(ValueError, match="init"):
        jacobi_generate(engine, PROMPTS, SamplingParams(), init="zeros")
    with pytest.raises(ValueError, match="copy_left and copy_up"):
        jacobi_generate(engine, PROMPTS, SamplingParams(), copy_left=0.6, copy_up=0.5)
    with pytest.raises(ValueError, match="unconditional prompt"):
        jacobi_generate(engine, PROMPTS, SamplingParams(cfg_scale=2.0))


# ---- the distribution: SJD samples against the exact joint of the model --------------------------------------------
def exact_joint(model, prompt, sp: SamplingParams) -> dict[tuple, float]:
    """P(image) for every image of SMALL, from full forwards: the product of the sampler's per-step distributions."""
    N, C, vs = SMALL.n_image_tokens, SMALL.codebook_size, SMALL.visual_slice
    images = torch.tensor(list(itertools.product(range(C), repeat=N)))  # [C^N, N]
    ids = images + SMALL.visual_offset
    with torch.no_grad():
        lc = model(torch.cat([torch.tensor(prompt).expand(len(ids), -1), ids], 1)).logits[:, -N - 1 : -1]
        lu = None
        if sp.use_cfg:
            lu = model(torch.cat([torch.tensor(UNCOND).expand(len(ids), -1), ids], 1)).logits[:, -N - 1 : -1]
        logp = final_logprobs(lc, lu, sp, vs).double()  # [C^N, N, C]
    joint = logp.gather(-1, images[..., None])[..., 0].sum(-1).exp()
    assert abs(joint.sum().item() - 1) < 1e-6
    return {tuple(im): float(pr) for im, pr in zip(images.tolist(), joint)}


def chi2_pvalue(samples: torch.Tensor, probs: dict[tuple, float], min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of [n, N] code samples to ``probs``; rare cells pooled into one."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    stat, cells, pooled_e, pooled_o = 0.0, 0, 0.0, 0
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e < min_expected:
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pooled_e > 0:
        stat, cells = stat + (pooled_o - pooled_e) ** 2 / max(pooled_e, 1e-12), cells + 1
    df = cells - 1
    # Wilson-Hilferty: (X/df)^(1/3) is close to normal; accurate enough for p-values down to ~1e-8 at df >= 10
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _sample_codes(engine, prompt, sp, jacobi: bool, **kw) -> torch.Tensor:
    out = jacobi_generate(engine, [prompt], sp, **kw) if jacobi else engine.generate([prompt], sp)
    return out.completion_ids - SMALL.visual_offset


SETTINGS = [  # defaults: coupling on, neighbour prior 0.4 left + 0.4 up
    dict(window=2, init="last", sp=SamplingParams(temperature=1.0, n=2000, seed=11)),
    dict(window=1, init="uniform", couple=False, copy_left=0.0, copy_up=0.0,
         sp=SamplingParams(temperature=0.8, cfg_scale=2.5, top_k=2, n=2000, seed=12)),
    dict(window=4, init="last", copy_left=0.7, copy_up=0.2,
         sp=SamplingParams(temperature=1.2, cfg_scale=1.5, top_p=0.9, n=2000, seed=13)),
]


@pytest.fixture(scope="module")
def peaked_engine():
    # a large init range: peaked, strongly context-dependent distributions (random drafts are often refused)
    model = tiny_model(seed=7, vocab=32, init=0.6, layout=SMALL)
    return TorchEngine(model, SMALL, uncond_prompt_ids=UNCOND)


@pytest.mark.parametrize("setting", SETTINGS, ids=["T1-w2", "cfg-topk-w1-uniform-nocouple-noprior", "cfg-topp-w4"])
def test_sjd_samples_follow_the_exact_joint(peaked_engine, setting):
    sp, kw = setting["sp"], {k: v for k, v in setting.items() if k != "sp"}
    for prompt in SMALL_PROMPTS:  # two prompt lengths: the shorter one is left-padded in a batch with the uncond
        probs = exact_joint(peaked_engine.model, prompt, sp)
        stats = JacobiStats(setting["window"])
        codes = _sample_codes(peaked_engine, prompt, sp, True, stats=stats, **kw)
        assert chi2_pvalue(codes, probs) > 1e-3
        # the check itself: plain sampling passes it, and SJD did refuse drafts here (the rule was exercised)
        assert chi2_pvalue(_sample_codes(peaked_engine, prompt, sp, False), probs) > 1e-3
        assert 0.05 < stats.accepted[0] / stats.tested[0] < 0.95, stats.summary()


@pytest.mark.parametrize("rule", ["always", "target_on_reject"])
@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[1]], ids=["defaults", "no-prior"])
def test_wrong_acceptance_rules_are_caught(peaked_engine, rule, setting):
    sp, kw = setting["sp"], {k: v for k, v in setting.items() if k != "sp"}
    pvalues = []
    for prompt in SMALL_PROMPTS:
        probs = exact_joint(peaked_engine.model, prompt, sp)
        pvalues.append(chi2_pvalue(_sample_codes(peaked_engine, prompt, sp, True, _rule=rule, **kw), probs))
    # resampling from p instead of the residual is a subtle bias: small where proposals are already close to p
    assert min(pvalues) < 1e-6, (rule, pvalues)


def position_pvalue(a: torch.Tensor, b: torch.Tensor, C: int, min_count: int = 10) -> float:
    """Smallest per-position two-sample chi-square p-value of code samples a [n, N] vs b [m, N], times N (Bonferroni:
    valid although positions are dependent). Codes seen fewer than ``min_count`` times in both together are pooled."""
    worst = 1.0
    for t in range(a.shape[1]):
        ha, hb = torch.bincount(a[:, t], minlength=C).double(), torch.bincount(b[:, t], minlength=C).double()
        big = (ha + hb) >= min_count
        ha = torch.cat([ha[big], ha[~big].sum()[None]])
        hb = torch.cat([hb[big], hb[~big].sum()[None]])
        keep = (ha + hb) > 0
        ha, hb = ha[keep], hb[keep]
        tot = ha + hb
        ea, eb = tot * len(a) / (len(a) + len(b)), tot * len(b) / (len(a) + len(b))
        stat = float(((ha - ea) ** 2 / ea + (hb - eb) ** 2 / eb).sum())
        df = max(len(tot) - 1, 1)
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        worst = min(worst, 0.5 * math.erfc(z / math.sqrt(2)))
    return min(1.0, worst * a.shape[1])


def test_per_position_histograms_match_plain_sampling():
    """Two-sample check on a longer image (12 tokens, 32 codes): per-position code frequencies, SJD vs plain."""
    engine = TorchEngine(tiny_model(seed=8, init=0.3), LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=1.0, cfg_scale=2.0, n=600)
    off, C = LAYOUT.visual_offset, LAYOUT.codebook_size
    plain = engine.generate(PROMPTS[:1], sp.with_(seed=2)).completion_ids - off
    sjd = jacobi_generate(engine, PROMPTS[:1], sp.with_(seed=1), window=6).completion_ids - off
    wrong = jacobi_generate(engine, PROMPTS[:1], sp.with_(seed=1), window=6, _rule="always").completion_ids - off
    assert position_pvalue(sjd, plain, C) > 1e-3
    assert position_pvalue(wrong, plain, C) < 1e-6


# ---- wiring: TorchEngine dispatch and `argrpo sample --jacobi` ------------------------------------------------------
def test_torch_engine_dispatches_on_sampling_jacobi():
    engine = TorchEngine(tiny_model(seed=9, dtype=torch.float64), LAYOUT, uncond_prompt_ids=UNCOND)
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0, n=2)
    plain = engine.generate(PROMPTS, sp)
    sjd = engine.generate(PROMPTS, sp.with_(jacobi=True))
    assert torch.equal(plain.completion_ids, sjd.completion_ids)
    assert "jacobi_forward_steps" in sjd.timings and "jacobi_forward_steps" not in plain.timings
    s = engine.generate(PROMPTS, sp.with_(jacobi=True, temperature=1.0, seed=4))
    assert torch.equal(s.completion_ids, jacobi_generate(engine, PROMPTS, sp.with_(temperature=1.0, seed=4)).completion_ids)


def test_sample_command_jacobi(tmp_path, monkeypatch, capsys):
    import json

    import argrpo.rollout.engines.jacobi as jacobi_module
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer
    from argrpo.recipes.cli import main

    g = torch.Generator().manual_seed(0)
    vq = VQTokenizer(torch.rand(5, 4, 4, generator=g) > 0.5, torch.tensor([[255, 0, 0], [0, 0, 255]], dtype=torch.uint8),
                     torch.tensor([255, 255, 255], dtype=torch.uint8), grid=(4, 4))
    tok = build_text_tokenizer(["a", "red", "blue", "circle"], SHAPES_SPECIAL_TOKENS)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size, grid=(4, 4),
                           image_size=vq.image_size)
    ckpt = tmp_path / "policy"
    save_policy(ckpt, build_policy(layout, size="tiny", seed=0, dtype=torch.float64), tok, layout, image_tokenizer=vq)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue circle\n")
    base = ["sample", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--n", "2", "--cfg", "2",
            "--temperature", "0"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    calls = []
    real = jacobi_module.jacobi_generate
    monkeypatch.setattr(jacobi_module, "jacobi_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(base + ["--out", str(tmp_path / "sjd"), "--jacobi"]) == 0
    assert calls  # the flag reached the engine
    for i in range(2):
        for k in range(2):
            f = f"{i:05d}/samples/{k:05d}.png"
            assert (tmp_path / "sjd" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f
    assert json.loads((tmp_path / "sjd" / "00001" / "metadata.jsonl").read_text()) == {"prompt": "a blue circle"}
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "x"), "--jacobi", "--engine", "vllm"]) == 2
    assert capsys.readouterr().err == "argrpo sample: --jacobi needs --engine torch (got 'vllm')\n"


# ---- long images: a Markov-chain model whose per-position marginals are known exactly -------------------------------
MARKOV = TokenLayout(
    name="custom", text_vocab_size=20, visual_offset=20, codebook_size=12, grid=(6, 6), image_size=(6, 6),
    prompt_template="{caption}",
)


def markov_model(stick=1.0, seed=0):
    """One layer whose attention and MLP outputs are zeroed: the next code depends only on the current token (a
    Markov chain with a sticky diagonal), while the KV cache, masks and positions are exercised as usual."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128)).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        emb, head, vs = model.model.embed_tokens.weight, model.lm_head.weight, MARKOV.visual_slice
        emb.normal_()
        head.normal_(0, 0.3)
        head[vs] += stick * emb[vs] / emb[vs].norm(dim=-1, keepdim=True) / math.sqrt(8)
    return model


def test_long_images_follow_the_exact_markov_marginals():
    """36 tokens, 16-token windows, many passes and ragged rows: every position's code distribution is exact."""
    model = markov_model()
    engine = TorchEngine(model, MARKOV)
    sp, prompt = SamplingParams(temperature=1.0, n=2000, seed=3), [1, 5, 6, 2]
    N, C, vs = MARKOV.n_image_tokens, MARKOV.codebook_size, MARKOV.visual_slice
    with torch.no_grad():
        first = final_logprobs(model(torch.tensor([prompt])).logits[:, -1], None, sp, vs)[0].double().exp()
        nxt = torch.tensor([prompt + [MARKOV.visual_offset + c] for c in range(C)])
        trans = final_logprobs(model(nxt).logits[:, -1], None, sp, vs).double().exp()  # [C, C]
    marginals = [first]
    for _ in range(N - 1):
        marginals.append(marginals[-1] @ trans)
    assert 0.2 < float(trans.diag().mean()) < 0.8  # sticky but random: drafts are often refused

    def pvalue(codes):  # smallest per-position goodness-of-fit p-value, x N (Bonferroni)
        return min(1.0, N * min(
            chi2_pvalue(codes[:, t : t + 1], {(c,): float(marginals[t][c]) for c in range(C)}) for t in range(N)))

    stats = JacobiStats(16)
    sjd = jacobi_generate(engine, [prompt], sp, stats=stats).completion_ids - MARKOV.visual_offset
    assert pvalue(sjd) > 1e-3
    assert pvalue(engine.generate([prompt], sp).completion_ids - MARKOV.visual_offset) > 1e-3
    assert stats.tokens_per_step > 2  # several tokens per pass were accepted
    wrong = jacobi_generate(engine, [prompt], sp, _rule="target_on_reject").completion_ids - MARKOV.visual_offset
    assert pvalue(wrong) < 1e-6
