import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from argrpo.data.shapes import ShapesWorld, perturb_spec
from argrpo.grpo.evaluate import EvalSettings, evaluate, load_prompt_set, select_prompts, summarize
from argrpo.models.image_tokenizers.vq import VQTokenizer
from argrpo.models.layout import layout_preset
from argrpo.models.policy import build_policy, load_policy, save_policy
from argrpo.models.text_tokenizer import build_text_tokenizer
from argrpo.recipes.cli import main
from argrpo.rollout.types import Rollout
from PIL import Image

GENEVAL_META = Path("/work/shared/geneval/evaluation_metadata.jsonl")
TAGS = ["color_attr", "colors", "counting", "position", "single_object", "two_object"]


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    _, images, _ = ShapesWorld().sample("train", 300, seed=11)
    path = tmp_path_factory.mktemp("vq")
    VQTokenizer.fit(images).save_pretrained(path)
    return path


def _policy(words, vq_dir, path):
    """A random tiny policy saved as a checkpoint (text vocabulary = ``words``)."""
    special = layout_preset("shapes", text_vocab_size=0, codebook_size=8).special_tokens
    tok = build_text_tokenizer(words, special_tokens=special)
    layout = layout_preset("shapes", text_vocab_size=len(tok), codebook_size=VQTokenizer.from_pretrained(vq_dir)
                           .codebook_size)
    save_policy(path, build_policy(layout, size="tiny", seed=0), tok, layout, image_tokenizer=str(vq_dir))
    return load_policy(path)


@pytest.fixture(scope="module")
def shapes_policy(vq, tmp_path_factory):
    return _policy(ShapesWorld().vocabulary(), vq, tmp_path_factory.mktemp("p") / "policy")


class RenderEngine:
    """A RolloutEngine stand-in that 'samples' the VQ codes of a render of each prompt's spec (or of a spec
    the render contradicts): a known-correct and a known-wrong policy for the rest of the evaluation chain."""

    def __init__(self, specs, tokenizer, layout, vq, wrong=False):
        from argrpo.rollout.engines.base import encode_prompts

        self.world, self.layout, self.vq, self.wrong = ShapesWorld(), layout, vq, wrong
        ids = encode_prompts(tokenizer, layout, [s["prompt"] for s in specs])
        self.by_ids = {tuple(i): s for i, s in zip(ids, specs)}
        self.weight_version = 0

    def generate(self, prompt_ids, sampling):
        rng = np.random.default_rng(0)
        images = []
        for p in prompt_ids:
            spec = self.by_ids[tuple(p)]
            if self.wrong:
                spec = perturb_spec(self.world, spec, rng)
            for k in range(sampling.n):
                images.append(self.world.render(spec, seed=sampling.seed + len(images) + k)[0])
        codes = self.vq.encode(np.stack(images)).reshape(len(images), -1)
        B = len(images)
        return Rollout(prompt_ids=[list(p) for p in prompt_ids for _ in range(sampling.n)],
                       completion_ids=codes + self.layout.visual_offset, logprobs=torch.zeros(B, codes.shape[1]))


def test_summarize_clusters_standard_errors_by_prompt():
    rng = np.random.default_rng(0)
    samples = []
    for idx in range(9):
        tag = ["a", "b", "c"][idx % 3]
        for _ in range(4):
            samples.append({"index": idx, "tag": tag, "correct": bool(rng.random() < 0.5)})
    overall, se, tags = summarize(samples)
    for t in ("a", "b", "c"):
        per_prompt = [np.mean([s["correct"] for s in samples if s["index"] == i]) for i in range(9)
                      if ["a", "b", "c"][i % 3] == t]
        flat = [s["correct"] for s in samples if s["tag"] == t]
        assert tags[t].accuracy == pytest.approx(np.mean(flat))
        assert tags[t].stderr == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(3))
        assert (tags[t].n_prompts, tags[t].n_images) == (3, 12)
    assert overall == pytest.approx(np.mean([tags[t].accuracy for t in tags]))
    assert se == pytest.approx(math.sqrt(sum(tags[t].stderr ** 2 for t in tags)) / 3)


def test_select_prompts_keeps_file_indices():
    specs = [{"tag": t, "prompt": str(i)} for i, t in enumerate("aabbbca")]
    assert [i for i, _ in select_prompts(specs, per_tag_limit=1)] == [0, 2, 5]
    assert [i for i, _ in select_prompts(specs, tags=["b"], limit=2)] == [2, 3]


def test_known_correct_and_known_wrong_images_score_one_and_zero(shapes_policy, vq, tmp_path):
    specs, _ = load_prompt_set("shapes:heldout", per_tag=2)
    tok = VQTokenizer.from_pretrained(vq)
    kw = dict(sampling={"n": 2, "seed": 0}, progress=False)
    good = evaluate(shapes_policy, tok, specs, engine=RenderEngine(specs, shapes_policy.tokenizer,
                                                                    shapes_policy.layout, tok), **kw)
    assert good.overall == 1.0 and sorted(good.tags) == TAGS and good.n_images == 24
    bad = evaluate(shapes_policy, tok, specs, engine=RenderEngine(specs, shapes_policy.tokenizer,
                                                                   shapes_policy.layout, tok, wrong=True), **kw)
    assert bad.overall == 0.0 and all(s["reasons"] for s in bad.samples)


def test_random_policy_scores_near_zero_and_outputs_are_written(shapes_policy, tmp_path):
    specs, _ = load_prompt_set("shapes:heldout", per_tag=2)
    out = tmp_path / "eval"
    res = evaluate(shapes_policy, None, specs, EvalSettings(output_dir=str(out), geneval_layout=True,
                                                            grid_prompts=2, progress=False),
                   sampling={"n": 2, "seed": 5, "cfg_scale": 2.0}, batch_prompts=6)
    assert res.overall < 0.1 and res.n_prompts == 12 and res.sampling["cfg_scale"] == 2.0
    data = json.loads((out / "results.json").read_text())
    assert data["overall"] == res.overall and sorted(data["tags"]) == TAGS
    md = (out / "results.md").read_text()
    assert all(f"| {t} |" in md for t in TAGS) and "**overall**" in md
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[3])["index"] == 1
    for t in TAGS:
        grid = Image.open(out / f"grid_{t}.png")
        assert grid.width >= 2 * 64 and grid.height >= 2 * 64
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}" for i in range(12)]
    assert json.loads((out / "images" / "00004" / "metadata.jsonl").read_text()) == specs[4]
    assert sorted(p.name for p in (out / "images" / "00004" / "samples").iterdir()) == ["00000.png", "00001.png"]
    # grid_prompts: 0 writes the results and images and no grid
    none = tmp_path / "no_grids"
    evaluate(shapes_policy, None, specs[:2], output_dir=str(none), geneval_layout=True, grid_prompts=0,
             sampling={"n": 1}, progress=False)
    assert (none / "results.json").is_file() and (none / "images" / "00001" / "samples" / "00000.png").is_file()
    assert not list(none.glob("grid_*.png"))
    # the policy's train/eval mode is restored for callers in the middle of training
    shapes_policy.model.train()
    evaluate(shapes_policy, None, specs[:1], sampling={"n": 1}, progress=False)
    assert shapes_policy.model.training
    shapes_policy.model.eval()


def test_samples_do_not_depend_on_batching(shapes_policy, tmp_path):
    specs = load_prompt_set("shapes:heldout", per_tag=1)[0][:3]
    runs = []
    for bp in (2, 3):
        out = tmp_path / f"b{bp}"
        evaluate(shapes_policy, None, specs, output_dir=str(out), geneval_layout=True, batch_prompts=bp,
                 sampling={"n": 3, "seed": 9}, progress=False)
        runs.append(out)
    for i in range(len(specs)):
        for k in range(3):
            a = np.asarray(Image.open(runs[0] / "images" / f"{i:05d}" / "samples" / f"{k:05d}.png"))
            b = np.asarray(Image.open(runs[1] / "images" / f"{i:05d}" / "samples" / f"{k:05d}.png"))
            assert (a == b).all()
    first = np.asarray(Image.open(runs[0] / "images" / "00000" / "samples" / "00000.png"))
    second = np.asarray(Image.open(runs[0] / "images" / "00000" / "samples" / "00001.png"))
    assert not (first == second).all()  # samples of one prompt differ


def test_eval_command_on_shapes(shapes_policy, tmp_path):
    out = tmp_path / "cli"
    rc = main(["eval", "recipes/configs/shapes/eval.yaml", "--set", f"policy={shapes_policy.path}",
               "--set", "shapes_per_tag=1", "--set", "sampling.n=1", "--set", f"output_dir={out}",
               "--set", "tags=[counting, position]", "--set", "progress=false"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["tags"]) == ["counting", "position"] and data["n_images"] == 2
    assert not (out / "images").exists()  # generated shapes prompts: GenEval layout off unless asked


def _tiny_owlv2(path):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL treats id 0 as padding
    for ch in sorted(ByteLevel.alphabet()):
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=CLIPTokenizerFast(vocab=vocab, merges=[], pad_token="!", model_max_length=16)
                   ).save_pretrained(path)
    return path


def test_eval_command_on_real_geneval_metadata_with_owlv2(vq, tmp_path):
    rows = [json.loads(line) for line in GENEVAL_META.read_text().splitlines() if line.strip()]
    words = {w for r in rows for w in r["prompt"].replace(".", " ").split()}
    policy = _policy(sorted(words), vq, tmp_path / "policy")
    owl = _tiny_owlv2(tmp_path / "owl")
    clip = {"model": "tiny-clip-eval", "pretrained": None, "device": "cpu", "model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}}
    out = tmp_path / "geneval"
    overrides = {"policy": str(policy.path), "prompts": str(GENEVAL_META), "per_tag_limit": 1,
                 "sampling": {"n": 2, "seed": 0, "cfg_scale": 1.5}, "detector": "owlv2",
                 "detector_kwargs": {"path": str(owl), "device": "cpu", "threshold": 0.0},
                 "color_classifier": clip, "rules": {"threshold": 0.0, "counting_threshold": 0.0},
                 "output_dir": str(out), "progress": False}
    args = ["eval", "recipes/configs/shapes/eval.yaml"]
    for k, v in overrides.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    firsts = {}
    for i, r in enumerate(rows):
        firsts.setdefault(r["tag"], i)
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["tags"]) == TAGS and data["n_images"] == 12 and data["detector"] == "owlv2"
    assert 0.0 <= data["overall"] <= 1.0
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert folders == [f"{i:05d}" for i in sorted(firsts.values())]  # GenEval layout, indices from the file
    for i in firsts.values():
        d = out / "images" / f"{i:05d}"
        assert json.loads((d / "metadata.jsonl").read_text()) == rows[i]
        pngs = sorted((d / "samples").iterdir())
        assert [p.name for p in pngs] == ["00000.png", "00001.png"]
        assert Image.open(pngs[0]).size == (64, 64)
    verdicts = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {v["tag"] for v in verdicts} == set(TAGS)
