"""Rollout workers and pools: prompt order, images, weight sync (full and LoRA), restarts, async handles."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
from argrpo.models.layout import TokenLayout
from argrpo.rollout import (
    LocalRolloutPool,
    PolicyComponents,
    RolloutConfig,
    RolloutPool,
    SamplingParams,
    build_rollout_pool,
)
from argrpo.rollout.worker import RolloutWorker

LAYOUT = TokenLayout(
    name="custom", text_vocab_size=40, visual_offset=40, codebook_size=32, grid=(3, 4), image_size=(6, 8),
    prompt_template="<t2i> {caption} <soi>", uncond_caption="",
)
WORDS = ["<pad>", "<t2i>", "<soi>", "a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "two"]
CAPTIONS = ["a red circle", "two blue squares", "a photo of a green triangle", "red", "a blue circle"]
LORA_TARGETS = ["q_proj", "v_proj"]


class PaletteDecoder:
    """A stand-in image tokenizer: code k -> a 2x2 block of colour k (enough to check decode wiring)."""

    codebook_size, grid, image_size = 32, (3, 4), (6, 8)

    def __init__(self):
        self.palette = torch.arange(32 * 3, dtype=torch.int64).reshape(32, 3).mul(7).remainder(256).to(torch.uint8)

    def decode(self, codes):
        img = self.palette[torch.as_tensor(codes)]  # [B, 3, 4, 3]
        return img.repeat_interleave(2, 1).repeat_interleave(2, 2)


def make_model(seed, lora=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.1,
    )).double().eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    return model


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def make_components(seed=0, lora=False):
    return PolicyComponents(make_model(seed, lora), LAYOUT, make_tokenizer(), PaletteDecoder())


def trained_adapter(seed):
    from peft import get_peft_model_state_dict

    model = make_model(0, lora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return get_peft_model_state_dict(model)


SP = SamplingParams(temperature=1.0, cfg_scale=2.0, seed=11)


def check_batch(out, P, G):
    assert len(out) == P * G
    assert out.completion_ids.shape == (P * G, LAYOUT.n_image_tokens)
    assert bool(LAYOUT.is_visual(out.completion_ids).all())
    assert out.images.dtype == np.uint8 and out.images.shape == (P * G, 6, 8, 3)
    # images are the decode of the completion ids, row by row
    expected = PaletteDecoder().decode(LAYOUT.ids_to_codes(out.completion_ids)).numpy()
    assert np.array_equal(out.images, expected)
    assert {"generate", "decode"} <= set(out.timings)


def test_local_pool_matches_engine_and_orders_prompts():
    comps = make_components()
    with LocalRolloutPool(comps) as pool:
        out = pool.generate(CAPTIONS, 3, SP)
        check_batch(out, len(CAPTIONS), 3)
        worker = pool.worker
        ids = worker._encode(CAPTIONS)
        for r in range(len(out)):
            assert out.prompt_ids[r] == ids[r // 3]
        # prompt order: generating one prompt alone with its rows' seeds gives the same samples
        alone = pool.generate([CAPTIONS[3]], 3, SP.with_(seed=SP.seed + 9))
        assert torch.equal(alone.completion_ids, out.completion_ids[9:12])
        fut = pool.generate_async(CAPTIONS, 3, SP)
        assert isinstance(fut.done(), bool)
        assert torch.equal(fut.result().completion_ids, out.completion_ids)
        with pytest.raises(ValueError, match="no prompts"):
            pool.generate([], 2, SP)


def test_local_pool_weight_sync_full_and_lora():
    with LocalRolloutPool(make_components()) as pool:
        before = pool.generate(CAPTIONS[:2], 2, SP)
        pool.load_weights(make_model(1).state_dict(), version=1)
        after = pool.generate(CAPTIONS[:2], 2, SP)
        assert pool.version == 1 and after.weight_version == 1
        assert not torch.equal(before.completion_ids, after.completion_ids)
    with LocalRolloutPool(make_components(lora=True)) as pool:
        before = pool.generate(CAPTIONS[:2], 2, SP)
        pool.load_weights(trained_adapter(0), version=4, adapter=True)
        after = pool.generate(CAPTIONS[:2], 2, SP)
        assert after.weight_version == 4 and not torch.equal(before.completion_ids, after.completion_ids)


def test_worker_errors():
    worker = RolloutWorker(PolicyComponents(make_model(0), LAYOUT))
    with pytest.raises(ValueError, match="tokenizer"):
        worker.generate(["a red circle"], SP)
    with pytest.raises(TypeError, match="all captions"):
        worker.generate(["a", [1, 2]], SP)
    out = worker.generate([[1, 3, 6, 9, 2]], SamplingParams(n=2, seed=0))
    assert out.images is None and len(out) == 2  # no image tokenizer: tokens only


def test_worker_from_checkpoint_dir(tmp_path):
    from argrpo.models.image_tokenizers.vq import VQTokenizer
    from argrpo.models.layout import layout_preset
    from argrpo.models.policy import build_policy, save_policy
    from argrpo.models.text_tokenizer import build_text_tokenizer
    from argrpo.rollout.worker import _loads_checkpoint, load_components

    vq = VQTokenizer(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5,
                     torch.tensor([[255, 0, 0], [0, 0, 255]]), torch.tensor([255, 255, 255]), grid=(2, 2))
    tok = build_text_tokenizer(["a", "red", "circle"], ("<|pad|>", "<|t2i|>", "<|soi|>", "<|eoi|>"))
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=vq.codebook_size, grid=(2, 2),
                           image_size=vq.image_size)
    save_policy(tmp_path / "ckpt", build_policy(layout, size="tiny"), tok, layout, image_tokenizer=vq)
    worker = RolloutWorker(str(tmp_path / "ckpt"))
    out = worker.generate(["a red circle", "a circle"], SamplingParams(n=2, cfg_scale=2.0, seed=0))
    assert out.images.shape == (4, 8, 8, 3) and bool(layout.is_visual(out.completion_ids).all())
    light = load_components(tmp_path / "ckpt", with_model=False)
    assert light.model is None and light.layout == layout and light.image_tokenizer.codebook_size == vq.codebook_size

    class ByPath:
        def __init__(self, checkpoint, layout):
            pass

    assert _loads_checkpoint(ByPath) and not _loads_checkpoint(type(worker.engine))


def test_rollout_config_validates():
    assert RolloutConfig().resolved_device() == "cpu"
    assert RolloutConfig(num_gpus_per_worker=0.5).resolved_device() == "cuda"
    with pytest.raises(ValueError, match="num_workers"):
        RolloutConfig(num_workers=-1)
    with pytest.raises(ValueError, match="mode"):
        RolloutConfig(mode="sometimes")
    from argrpo.config import describe

    assert "num_cpus_per_worker" in describe(RolloutConfig)


@pytest.fixture(scope="module")
def picklable_here():
    import ray

    # the components live in this test module, which Ray's workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ray_pool(ray_cluster, picklable_here):
    import ray

    G = 2
    cfg = RolloutConfig(num_workers=2, num_cpus_per_worker=1, max_restarts=2, max_task_retries=2)
    local = LocalRolloutPool(functools.partial(make_components, 0, True))
    with build_rollout_pool(functools.partial(make_components, 0, True), cfg) as pool:
        assert isinstance(pool, RolloutPool) and pool.num_workers == 2
        assert len(set(pool.worker_pids())) == 2
        info = ray.get(pool.workers[0].info.remote())  # runtime_env sized the actor's thread pool
        assert info["omp_num_threads"] == info["mkl_num_threads"] == "1" and info["torch_threads"] == 1
        assert info["engine"] == "TorchEngine" and info["device"] == "cpu"
        out = pool.generate(CAPTIONS, G, SP)
        check_batch(out, len(CAPTIONS), G)
        # the 2-worker split returns exactly what one in-process worker returns: prompt order is kept
        ref = local.generate(CAPTIONS, G, SP)
        assert torch.equal(out.completion_ids, ref.completion_ids)
        assert out.prompt_ids == ref.prompt_ids
        torch.testing.assert_close(out.logprobs, ref.logprobs)

        # LoRA adapter through the object store: outputs change, version increments, same as in-process
        adapter = trained_adapter(1)
        pool.load_weights(adapter, version=1, adapter=True)
        local.load_weights(adapter, version=1, adapter=True)
        lora = pool.generate(CAPTIONS, G, SP)
        assert lora.weight_version == 1 and pool.version == 1
        assert not torch.equal(lora.completion_ids, out.completion_ids)
        assert torch.equal(lora.completion_ids, local.generate(CAPTIONS, G, SP).completion_ids)

        # full weights (a PeftModel's own state dict): version 2, outputs change again
        full_model = make_model(0, lora=True)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(full_model, trained_adapter(2))
        pool.load_weights(full_model.state_dict(), version=2)
        full = pool.generate(CAPTIONS, G, SP)
        assert full.weight_version == 2 and not torch.equal(full.completion_ids, lora.completion_ids)

        # a worker killed while generating is rebuilt by Ray from its constructor arguments; the pool sees its
        # stale weight version, re-sends the latest weights and redoes that worker's part
        expected = pool.generate(CAPTIONS, 8, SP)
        old_pids = pool.worker_pids()
        fut = pool.generate_async(CAPTIONS, 8, SP)
        ray.kill(pool.workers[1], no_restart=False)
        again = fut.result()
        assert again.weight_version == 2
        assert torch.equal(again.completion_ids, expected.completion_ids)
        assert pool._resends >= 1
        new_pids = pool.worker_pids()
        assert new_pids[1] != old_pids[1] and new_pids[0] == old_pids[0]
    local.shutdown()
