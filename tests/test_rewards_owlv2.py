"""OWLv2 detector plumbing on a tiny random Owlv2 saved locally, end to end on the real GenEval metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from argrpo.rewards.base import build_reward
from argrpo.rewards.detectors.base import DETECTORS
from argrpo.rewards.geneval import score_batch, spec_classes

GENEVAL_META = Path("/work/shared/geneval/evaluation_metadata.jsonl")
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    # OWL treats a query whose first id is 0 as padding (the real vocabulary's pad token "!" is id 0): bos must not be 0
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizerFast(vocab=vocab, merges=[], pad_token="!", model_max_length=16)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(cfg)
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    path = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def images(n, h=48, w=64, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def test_owlv2_matches_transformers_post_processing(owl_dir):
    from argrpo.rewards.geneval import build_detector
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    detector = build_detector("owlv2", path=str(owl_dir), device="cpu", threshold=0.0, max_boxes=1000)
    assert isinstance(detector, DETECTORS["owlv2"])
    img = images(1)[0]
    classes = ["dog", "cat"]
    ours = detector([img], [classes])[0]

    proc, model = Owlv2Processor.from_pretrained(owl_dir), Owlv2ForObjectDetection.from_pretrained(owl_dir).eval()
    with torch.no_grad():
        out = model(**proc(text=[[f"a photo of a {c}" for c in classes]], images=[img], return_tensors="pt"))
    ref = proc.post_process_grounded_object_detection(out, threshold=0.0, target_sizes=[img.shape[:2]],
                                                      text_labels=[classes])[0]
    want = ref["boxes"].clone()
    want[:, 0::2] = want[:, 0::2].clamp(0, img.shape[1])
    want[:, 1::2] = want[:, 1::2].clamp(0, img.shape[0])
    ref_rows = np.array([[classes.index(lab), float(sc), *map(float, b)]
                         for sc, lab, b in zip(ref["scores"], ref["text_labels"], want)])
    our_rows = np.array([[classes.index(d.label), d.score, *d.box] for d in ours])

    def canonical(rows):  # boxes with equal scores may come in either order
        return rows[np.lexsort(np.round(rows, 2).T[::-1])]

    np.testing.assert_allclose(canonical(our_rows), canonical(ref_rows), rtol=1e-4, atol=1e-3)
    assert [d.score for d in ours] == sorted((d.score for d in ours), reverse=True)
    assert {d.label for d in ours} == {"dog", "cat"}


def test_owlv2_batches_with_different_query_counts(owl_dir):
    from argrpo.rewards.geneval import build_detector

    detector = build_detector("owlv2", path=str(owl_dir), device="cpu", threshold=0.0)
    imgs = images(3, seed=1)
    classes = [["dog"], ["cup", "cat", "kite"], []]
    together = detector(imgs, classes)
    alone = [detector([im], [cls])[0] for im, cls in zip(imgs, classes)]
    assert together[2] == []
    for a, b, cls in zip(together, alone, classes):
        assert [d.label for d in a] == [d.label for d in b]
        assert all(d.label in cls for d in a)  # a padded blank query never wins a box
        np.testing.assert_allclose([d.score for d in a], [d.score for d in b], rtol=1e-4, atol=1e-6)
    assert {d.label for d in together[1]} - {"cup", "cat", "kite"} == set()


def test_geneval_reward_end_to_end_on_real_metadata(owl_dir):
    rows = [json.loads(line) for line in GENEVAL_META.read_text().splitlines() if line.strip()]
    by_tag = {}
    for row in rows:
        by_tag.setdefault(row["tag"], [])
        if not by_tag[row["tag"]]:
            by_tag[row["tag"]].append(row)
    batch = [r for tag in sorted(by_tag) for r in by_tag[tag]]
    assert len(batch) == 6
    # thresholds at 0 so every class gets boxes and the colour and position paths really run on random weights
    kwargs = dict(detector="owlv2", detector_kwargs={"path": str(owl_dir), "device": "cpu", "threshold": 0.0},
                  color_classifier={"model": "tiny-clip-owl", "pretrained": None, "model_cfg": TINY_CLIP,
                                    "device": "cpu"},
                  rules={"threshold": 0.0, "counting_threshold": 0.0})
    reward = build_reward("geneval", **kwargs)
    imgs = images(len(batch), seed=2)
    meta = [json.dumps(r) for r in batch]
    out = reward(prompts=[r["prompt"] for r in batch], images=imgs, metadata=meta)
    assert len(out) == 6 and set(out) <= {0.0, 1.0}
    assert sorted(k for k in out.extras if k.startswith("tag/")) == [f"tag/{t}" for t in sorted(by_tag)]

    judged = reward.judge(imgs, meta)
    kinds = {c["kind"] for _, d in judged for c in d["checks"]}
    assert kinds == {"count", "color", "position", "exclude"}
    colour_rows = [d for (_, d), r in zip(judged, batch) if any("color" in q for q in r["include"])]
    assert colour_rows and all(d["colors"] for d in colour_rows)  # CLIP judged colours on the crops
    assert [float(c) for c, _ in judged] == list(out)
    # the dense reward on the same judgements: the fraction of checks met, never below the binary verdict
    assert [d["fraction"] for _, d in judged] == list(build_reward(
        "geneval_dense", detector=reward.detector, color_classifier=reward.color_fn(),
        rules=kwargs["rules"])(prompts=None, images=imgs, metadata=meta))
    assert all(d["fraction"] >= float(c) for c, d in judged)
    # the default thresholds keep far fewer boxes of this random model than thresholds at 0
    strict = score_batch(meta, reward.detector(imgs, [spec_classes(r) for r in batch]), imgs, reward.color_fn())
    n_strict = sum(len(b) for _, d in strict for b in d["detected"].values())
    n_all = sum(len(b) for _, d in judged for b in d["detected"].values())
    assert n_strict < n_all

