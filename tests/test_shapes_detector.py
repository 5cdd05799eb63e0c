"""The exact shapes detector: segmentation, connected components, shape check at blob size, calibrated scores, and
GenEval verdicts on renders, perturbed specs, VQ reconstructions, random codes and degraded images."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from argrpo.data.shapes import (
    PALETTE,
    TAGS,
    ShapesWorld,
    blur_and_noise,
    perturb_spec,
    shape_mask,
)
from argrpo.models.image_tokenizers.vq import VQTokenizer
from argrpo.rewards.detectors.base import DETECTORS, Detection
from argrpo.rewards.detectors.shapes import SHAPE_MASKS, ShapesDetector, ShapesLook, connected_components
from argrpo.rewards.geneval import score_image
from PIL import Image

WORLD = ShapesWorld()
BG = WORLD.background


@pytest.fixture(scope="module")
def det():
    return ShapesDetector(WORLD)


@pytest.fixture(scope="module")
def rendered():
    """10 specs per tag from each split, with renders and records."""
    out = ([], [], [])
    for split, seed in (("train", 10), ("heldout", 11)):
        specs, images, records = WORLD.sample(split, 10 * len(TAGS), seed)
        out[0].extend(specs), out[1].append(images), out[2].extend(records)
    return out[0], np.concatenate(out[1]), out[2]


@pytest.fixture(scope="module")
def clean_detections(det, rendered):
    return det.detect(rendered[1])


@pytest.fixture(scope="module")
def tok():
    return VQTokenizer.fit(WORLD.sample("train", 300, 0)[1])


def _verdicts(det, specs, images=None, detections=None):
    detections = detections if detections is not None else det.detect(images)
    return [score_image(s, d)[0] for s, d in zip(specs, detections)]


def _canvas(size=64):
    img = np.empty((1, size, size, 3), np.uint8)
    img[:] = BG
    return img


def _paint(img, mask, x, y, color="red"):
    h, w = mask.shape
    img[0, y:y + h, x:x + w][mask] = PALETTE[color]
    return img


def test_registered():
    assert DETECTORS.lookup("shapes") is ShapesDetector
    # by default the detector expects the default world's look; a world is a look (the detector accepts either)
    look, world = DETECTORS["shapes"]().world, ShapesWorld()
    assert isinstance(look, ShapesLook) and isinstance(world, ShapesLook)
    assert (look.shapes, look.colors, look.sizes, look.background) == (
        world.shapes, world.colors, world.sizes, world.background)
    assert look.palette == world.palette


def test_renders_are_detected_exactly(rendered, clean_detections):
    _, _, records = rendered
    for dets, rec in zip(clean_detections, records):
        got = sorted((d.label, d.color, d.box) for d in dets)
        want = sorted((o["class"], o["color"], tuple(float(v) for v in o["box"])) for o in rec["objects"])
        assert got == want
        assert all(d.score == 1.0 for d in dets)


def test_geneval_verdicts_on_renders_and_perturbed_specs(det, rendered, clean_detections):
    specs, _, _ = rendered
    assert np.mean(_verdicts(det, specs, detections=clean_detections)) >= 0.99
    rng = np.random.default_rng(0)
    wrong = [perturb_spec(WORLD, s, rng) for s in specs]
    assert np.mean(_verdicts(det, wrong, detections=clean_detections)) <= 0.01


def test_same_verdict_on_vq_reconstructions(det, rendered, clean_detections, tok):
    specs, images, _ = rendered
    recon = tok.decode(tok.encode(images)).numpy()
    assert _verdicts(det, specs, recon) == _verdicts(det, specs, detections=clean_detections)


def test_random_codes_score_near_zero(det, tok):
    specs = WORLD.make_specs("train", 180, seed=12)
    g = torch.Generator().manual_seed(0)
    images = tok.decode(torch.randint(0, tok.codebook_size, (len(specs), 8, 8), generator=g)).numpy()
    ok = _verdicts(det, specs, images)
    by_tag = defaultdict(list)
    for s, v in zip(specs, ok):
        by_tag[s["tag"]].append(v)
    assert np.mean(ok) <= 0.02
    assert all(np.mean(v) <= 0.05 for v in by_tag.values()), {t: np.mean(v) for t, v in by_tag.items()}


def test_robust_to_blur_and_noise(det, rendered):
    specs, images, _ = rendered
    for sigma, std in ((0.7, 8.0),):
        degraded = blur_and_noise(images, sigma, std, seed=1)
        assert np.mean(_verdicts(det, specs, degraded)) >= 0.98, (sigma, std)


# ---- the stages ----------------------------------------------------------------------------------------------------
def _bfs_components(lab):
    h, w = lab.shape
    out = -np.ones((h, w), int)
    for y in range(h):
        for x in range(w):
            if lab[y, x] < 0 or out[y, x] >= 0:
                continue
            out[y, x] = y * w + x
            stack = [(y, x)]
            while stack:
                a, b = stack.pop()
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < h and 0 <= d < w and out[c, d] < 0 and lab[c, d] == lab[y, x]:
                        out[c, d] = y * w + x
                        stack.append((c, d))
    return out


def test_connected_components_match_a_reference():
    g = torch.Generator().manual_seed(0)
    # random labels, including spirals of one label winding through others
    labels = torch.randint(-1, 3, (4, 24, 24), generator=g)
    labels[3] = -1
    labels[3, 2, 2:22] = labels[3, 2:22, 21] = labels[3, 21, 2:22] = labels[3, 5:22, 2] = labels[3, 5, 2:19] = 1
    comp = connected_components(labels)
    for i in range(4):
        got = comp[i].numpy().copy()
        got[got >= 0] -= i * 24 * 24
        assert np.array_equal(got, _bfs_components(labels[i].numpy()))


def test_segmentation_tolerates_soft_edges_only(det):
    img = _canvas(14)
    red, bg = np.array(PALETTE["red"]), np.array(BG)
    bands = [
        PALETTE["red"],                          # pure colour
        (bg + 0.6 * (red - bg)).round(),         # a 60% blend with the background: still red
        (bg + 0.4 * (red - bg)).round(),         # a 40% blend: background
        PALETTE["pink"],                         # not a colour of this world
        np.clip(red + [9, -7, 8], 0, 255),       # red with noise
        PALETTE["blue"],
    ]
    for k, rgb in enumerate(bands):  # 2-pixel bands: thinner lines would be dropped as spurs
        img[0, 2 * k:2 * k + 2, :] = rgb
    lab = det.segment(img)[0][::2, 0].tolist()
    red_i, blue_i = WORLD.colors.index("red"), WORLD.colors.index("blue")
    assert lab == [red_i, red_i, -1, -1, red_i, blue_i, -1]


def test_specks_and_spurs_are_cleaned(det):
    img = _canvas(16)
    img[0, 2:10, 2:10] = PALETTE["red"]
    img[0, 5, 5] = BG                    # a noise hole: filled
    img[0, 10, 4] = PALETTE["red"]       # a one-pixel spur below the square: dropped
    img[0, 13, 13] = PALETTE["blue"]     # a speck: dropped
    lab = det.segment(img)[0]
    red_i = WORLD.colors.index("red")
    want = torch.full((16, 16), -1)
    want[2:10, 2:10] = red_i
    assert torch.equal(lab, want)


@pytest.mark.parametrize("world", [WORLD, ShapesWorld(shapes=tuple(SHAPE_MASKS), colors=tuple(PALETTE))],
                         ids=["default", "5shapes"])
def test_every_class_is_told_apart_at_every_plausible_size(world):
    det = ShapesDetector(world)
    for size in range(12, 31):
        for cls in world.shapes:
            label, iou, ious = det.classify(shape_mask(cls, size))
            assert label == cls and iou == 1.0
            # the runner-up class would score 0: no shape passes for another
            assert max(v for k, v in ious.items() if k != cls) < det.iou_low, (cls, size, ious)


@pytest.mark.parametrize(
    "name,mask",
    [
        ("tiny square", np.ones((8, 8), bool)),
        ("huge square", np.ones((40, 40), bool)),
        ("bar", np.ones((12, 30), bool)),
        ("ellipse", shape_mask("circle", 24, 16)),
        ("ring", shape_mask("circle", 24) & ~np.pad(shape_mask("circle", 14), 5)),
        ("half disc", np.vstack([shape_mask("circle", 24)[:12], np.zeros((12, 24), bool)])[:12]),
        ("L shape", np.block([[np.ones((12, 12), bool), np.zeros((12, 12), bool)], [np.ones((12, 24), bool)]])),
    ],
)
def test_implausible_blobs_are_not_confident_detections(det, name, mask):
    img = _paint(_canvas(), mask, 10, 10)
    dets = det.detect(img)[0]
    assert all(d.score < 0.3 for d in dets), (name, dets)


def test_off_grid_shapes_of_other_sizes_are_still_found(det):
    img = _canvas()
    _paint(img, shape_mask("circle", 19), 3, 5, "green")
    _paint(img, shape_mask("triangle", 22), 33, 37, "yellow")
    dets = det.detect(img)[0]
    assert sorted((d.label, d.color, d.box) for d in dets) == [
        ("circle", "green", (3.0, 5.0, 22.0, 24.0)), ("triangle", "yellow", (33.0, 37.0, 55.0, 59.0))]
    assert all(d.score == 1.0 for d in dets)


def test_scores_fall_with_damage(det):
    scores = []
    for n_bites in (0, 1, 2, 3):
        mask = shape_mask("square", 24).copy()
        for k in range(n_bites):
            mask[:6, 6 * k:6 * k + 6] = False  # notches out of the top edge
        d = det.detect(_paint(_canvas(), mask, 20, 20))[0]
        scores.append(max((x.score for x in d), default=0.0))
    assert scores[0] == 1.0 and scores[-1] < 0.3
    assert all(a >= b for a, b in zip(scores, scores[1:])) and scores[1] < 1.0


def test_call_filters_classes_and_accepts_common_inputs(det, rendered):
    specs, images, _ = rendered
    imgs = images[:4]
    classes = [["circle"], ["square", "triangle"], [], list(WORLD.shapes)]
    out = det(imgs, classes)
    full = det.detect(imgs)
    for o, f, cs in zip(out, full, classes):
        assert o == [d for d in f if d.label in cs]
        assert all(isinstance(d, Detection) for d in o)
    assert det(torch.from_numpy(imgs), classes) == out
    assert det([Image.fromarray(x) for x in imgs], classes) == out
    assert det.detect(imgs[0]) == full[:1]
    with pytest.raises(ValueError, match="4 images but 1 class lists"):
        det(imgs, [["circle"]])
    with pytest.raises(ValueError, match="uint8"):
        det.detect(imgs.astype(np.float32))
    assert det.detect(_canvas()) == [[]]


def test_scores_sorted_and_labels_cover_the_world(clean_detections):
    labels = Counter()
    for dets in clean_detections:
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        labels.update(d.label for d in dets)
    assert set(labels) == set(WORLD.shapes)


def test_geneval_reward_with_the_shapes_detector(rendered, clean_detections):
    import json

    from argrpo.rewards.base import build_reward

    specs, images, _ = rendered
    reward = build_reward("geneval", detector="shapes")
    k = 24
    rng = np.random.default_rng(3)
    metas = [json.dumps(s if i % 2 else perturb_spec(WORLD, s, rng)) for i, s in enumerate(specs[:k])]
    out = reward([json.loads(m)["prompt"] for m in metas], list(images[:k]), metadata=metas)
    assert list(out) == [float(i % 2) for i in range(k)]
