"""The ``geneval`` reward through the registry with the exact shapes detector, on rendered shapes-world images."""

from __future__ import annotations

import json

import numpy as np
from argrpo.rewards.base import build_reward
from argrpo.rewards.geneval import score_image


def test_geneval_on_rendered_shapes():
    from argrpo.data.shapes import ShapesWorld, perturb_spec, record_detections

    world = ShapesWorld()
    specs, images, records = world.sample("train", 24, seed=0)
    reward = build_reward("geneval", detector="shapes")
    meta = [json.dumps(s) for s in specs]
    out = reward(prompts=[s["prompt"] for s in specs], images=images, metadata=meta)
    # a render satisfies its own prompt
    assert list(out) == [1.0] * len(specs), [r for r, ok in zip(specs, out) if not ok]
    assert {k for k in out.extras if k.startswith("tag/")} == {f"tag/{t}" for t in {s["tag"] for s in specs}}

    # and fails a prompt changed in one colour, count, class or relation
    rng = np.random.default_rng(1)
    wrong = [perturb_spec(world, s, rng) for s in specs]
    bad = reward(prompts=[s.get("prompt", "") for s in wrong], images=images, metadata=wrong)
    assert list(bad) == [0.0] * len(specs)
    dense = build_reward("geneval_dense", detector="shapes")(None, images, metadata=wrong)
    assert all(0.0 <= v < 1.0 for v in dense) and sum(dense) > 0  # most checks still hold: a denser signal

    # the detector finds what the renderer drew: same verdicts as the renderer's own boxes, on every spec
    dets = reward.detector(images, [list(world.shapes)] * len(images))
    for d, rec, spec, bad_spec in zip(dets, records, specs, wrong):
        assert score_image(spec, record_detections(rec))[0] and score_image(spec, d)[0]
        assert not score_image(bad_spec, record_detections(rec))[0] and not score_image(bad_spec, d)[0]
        assert sorted(x.label for x in d) == sorted(o["class"] for o in rec["objects"])
