"""GenEval rules on hand-built detections: every rule, its thresholds and its failure wording."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from argrpo.rewards.base import RewardError, build_reward
from argrpo.rewards.detectors.base import Detection
from argrpo.rewards.geneval import (
    GenEvalReward,
    GenEvalRules,
    box_iou,
    parse_spec,
    relative_position,
    score_batch,
    score_image,
    select_detections,
)

GENEVAL_META = Path("/work/shared/geneval/evaluation_metadata.jsonl")


def det(label, score, cx, cy, w=10, h=10, color=None):
    return Detection(label, score, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), color)


def spec(tag, include, exclude=None):
    out = {"tag": tag, "include": include, "prompt": "p"}
    if exclude is not None:
        out["exclude"] = exclude
    return out


# ------------------------------------------------------------------ thresholds


def test_confidence_threshold_is_strict_and_0_3():
    s = spec("single_object", [{"class": "dog", "count": 1}])
    assert score_image(s, [det("dog", 0.31, 20, 20)])[0]
    assert not score_image(s, [det("dog", 0.3, 20, 20)])[0]
    assert not score_image(s, [det("cat", 0.99, 20, 20)])[0]  # another class does not count


def test_counting_prompts_need_0_9():
    s = spec("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    assert score_image(s, [det("cup", 0.95, 10, 10), det("cup", 0.92, 40, 40)])[0]
    # the same boxes at 0.8 are enough for any other tag, not for counting
    low = [det("cup", 0.8, 10, 10), det("cup", 0.8, 40, 40)]
    assert not score_image(s, low)[0]
    assert score_image({**s, "tag": "two_object"}, low)[0]


def test_exclude_counts_kept_boxes_only():
    s = spec("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}])
    two = [det("cup", 0.95, 10, 10), det("cup", 0.95, 40, 40)]
    ok, d = score_image(s, two + [det("cup", 0.5, 70, 70)])  # third box is below the counting threshold
    assert ok and d["fraction"] == 1.0
    ok, d = score_image(s, two + [det("cup", 0.91, 70, 70)])
    assert not ok
    assert d["reasons"] == ["expected cup<3, found 3"]
    assert [c["ok"] for c in d["checks"]] == [True, False]
    assert d["fraction"] == 0.5


def test_max_objects_caps_boxes_per_class():
    s = spec("counting", [{"class": "cup", "count": 17}])
    dets = [det("cup", 0.95, 5 * i, 5) for i in range(20)]
    assert not score_image(s, dets)[0]
    assert len(select_detections(dets, s, GenEvalRules())["cup"]) == 16
    assert score_image(s, dets, rules=GenEvalRules(max_objects=20))[0]


def test_nms_off_by_default_and_removes_overlaps_when_on():
    s = spec("counting", [{"class": "cup", "count": 2}])
    dets = [det("cup", 0.95, 20, 20), det("cup", 0.93, 21, 20)]  # nearly the same box
    assert box_iou(dets[0].box, dets[1].box) > 0.8
    assert score_image(s, dets)[0]
    assert not score_image(s, dets, rules=GenEvalRules(max_overlap=0.5))[0]


def test_box_iou_uses_inclusive_pixels():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    # 10x10 and 10x10 overlapping on 5 columns: 50 / (100 + 100 - 50)
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


# ------------------------------------------------------------------ include AND


def test_include_clauses_are_anded():
    s = spec("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}])
    assert score_image(s, [det("dog", 0.9, 10, 10), det("cat", 0.9, 40, 40)])[0]
    ok, d = score_image(s, [det("dog", 0.9, 10, 10)])
    assert not ok and d["fraction"] == 0.5
    assert d["reasons"] == ["expected cat>=1, found 0"]


# ------------------------------------------------------------------ colour


def test_colour_is_judged_on_the_most_confident_boxes():
    s = spec("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert score_image(s, [det("car", 0.9, 10, 10, color="red"), det("car", 0.8, 40, 40, color="blue")])[0]
    ok, d = score_image(s, [det("car", 0.9, 10, 10, color="blue"), det("car", 0.8, 40, 40, color="red")])
    assert not ok
    assert d["colors"] == {0: ["blue"]}
    assert d["reasons"][0].startswith("expected red car>=1, found 0 red; and 1 blue")
    assert [c["kind"] for c in d["checks"]] == ["count", "color"]


def test_colour_count_needs_every_judged_box():
    s = spec("color_attr", [{"class": "car", "count": 2, "color": "red"}])
    red2 = [det("car", 0.9, 10, 10, color="red"), det("car", 0.8, 40, 40, color="red")]
    assert score_image(s, red2)[0]
    assert not score_image(s, [red2[0], det("car", 0.8, 40, 40, color="green")])[0]


def test_colour_classifier_is_called_on_colourless_boxes():
    calls = []

    def color_fn(image, boxes, cls):
        calls.append((image.shape, [tuple(b) for b in boxes], cls))
        return ["green" if b[0] < 20 else "white" for b in boxes]

    image = np.zeros((64, 64, 3), np.uint8)
    s = spec("color_attr", [{"class": "bus", "count": 1, "color": "green"}, {"class": "cup", "count": 1, "color": "white"}])
    dets = [det("bus", 0.9, 10, 10), det("bus", 0.5, 40, 10), det("cup", 0.7, 40, 40), det("cup", 0.6, 50, 50, color="red")]
    ok, d = score_image(s, dets, image, color_fn)
    assert ok, d["reasons"]
    # only the top-1 box of each class is classified; a box with a given colour is never re-classified
    assert calls == [((64, 64, 3), [dets[0].box], "bus"), ((64, 64, 3), [dets[2].box], "cup")]
    with pytest.raises(ValueError, match="colour"):
        score_image(s, dets)  # no classifier


# ------------------------------------------------------------------ position


def test_relative_position_margin():
    a, b = det("a", 1, 30, 50).box, det("b", 1, 50, 50).box
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    # centres 3 px apart, boxes 10 px wide: the 0.1 * (10 + 10) = 2 px margin leaves 1/3 of the offset (< 0.5)
    near_a, near_b = det("a", 1, 47, 50).box, det("b", 1, 50, 50).box
    assert relative_position(near_a, near_b) == set()
    assert relative_position(near_a, near_b, margin=0.0) == {"left of"}
    # within the margin on both axes: no relation at all
    assert relative_position(det("a", 1, 49, 49).box, near_b) == set()
    # diagonal: both relations; y grows downwards
    assert relative_position(det("a", 1, 40, 40).box, near_b) == {"left of", "above"}
    assert relative_position(det("a", 1, 50, 70).box, near_b) == {"below"}
    # the margin scales with the boxes' sizes: 5 px apart is enough for small boxes, not for wide ones
    assert relative_position(det("a", 1, 45, 50, w=4).box, det("b", 1, 50, 50, w=4).box) == {"left of"}
    assert relative_position(det("a", 1, 45, 50, w=20).box, det("b", 1, 50, 50, w=20).box) == set()


def test_position_clause():
    s = spec("position", [{"class": "kite", "count": 1}, {"class": "cup", "count": 1, "position": ["above", 0]}])
    kite = det("kite", 0.9, 32, 50)
    assert score_image(s, [kite, det("cup", 0.9, 32, 10)])[0]
    ok, d = score_image(s, [kite, det("cup", 0.9, 32, 49)])  # inside the margin
    assert not ok
    assert d["reasons"] == ["expected cup above target, found  target"]
    ok, d = score_image(s, [kite, det("cup", 0.9, 32, 60)])
    assert not ok and d["reasons"] == ["expected cup above target, found below target"]
    ok, d = score_image(s, [det("cup", 0.9, 32, 10)])  # no target
    assert not ok
    assert d["reasons"] == ["expected kite>=1, found 0", "no target for cup to be above"]
    assert d["fraction"] == pytest.approx(1 / 3)


def test_position_uses_most_confident_boxes_and_all_pairs():
    s = spec("position", [{"class": "kite", "count": 1}, {"class": "cup", "count": 2, "position": ["left of", 0]}])
    kite = det("kite", 0.9, 50, 30)
    cups_ok = [det("cup", 0.9, 10, 30), det("cup", 0.8, 20, 30)]
    assert score_image(s, [kite, *cups_ok])[0]
    # a third, less confident cup to the right is not judged
    assert score_image(s, [kite, *cups_ok, det("cup", 0.5, 60, 30)])[0]
    # but when it is among the top two, it is
    assert not score_image(s, [kite, cups_ok[0], det("cup", 0.85, 60, 30)])[0]
    # a second kite less confident than the first is not a target
    assert score_image(s, [kite, det("kite", 0.4, 5, 30), *cups_ok])[0]


def test_position_target_whose_colour_failed_fails_the_image():
    s = spec("color_attr", [{"class": "kite", "count": 1, "color": "red"},
                            {"class": "cup", "count": 1, "position": ["left of", 0]}])
    dets = [det("kite", 0.9, 50, 30, color="blue"), det("cup", 0.9, 10, 30)]
    ok, d = score_image(s, dets)
    assert not ok
    # the dense score still credits the position, which holds geometrically
    assert [c["ok"] for c in d["checks"]] == [True, False, True, True]


# ------------------------------------------------------------------ spec parsing


def test_parse_spec_errors_name_the_row():
    with pytest.raises(ValueError, match="row 1: include\\[0\\]: colour 'teal'"):
        score_batch([spec("colors", [{"class": "a", "count": 1}]), spec("colors", [{"class": "a", "count": 1, "color": "teal"}])],
                    [[], []])
    with pytest.raises(ValueError, match="earlier include index"):
        parse_spec(spec("position", [{"class": "a", "count": 1, "position": ["left of", 0]}]))
    with pytest.raises(ValueError, match="'count' must be a positive integer"):
        parse_spec(spec("counting", [{"class": "a", "count": 0}]))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_spec("{oops")
    with pytest.raises(ValueError, match="'include'"):
        parse_spec({"tag": "x"})


def test_every_real_geneval_row_parses():
    rows = [json.loads(line) for line in GENEVAL_META.read_text().splitlines() if line.strip()]
    assert len(rows) == 553
    for i, row in enumerate(rows):
        parse_spec(json.dumps(row), f"row {i}")
    # a perfect detector (boxes laid out to satisfy the row, colours given) makes every row correct
    for i, row in enumerate(rows):
        assert score_image(row, _perfect_detections(row))[0], (i, row)


def _perfect_detections(row):
    """Boxes that satisfy a row: objects in a left-to-right / top-to-bottom arrangement as the row asks."""
    pos = {}
    dets = []
    for i, req in enumerate(row["include"]):
        cx, cy = 100.0 + 300 * i, 100.0
        if "position" in req:
            rel, j = req["position"]
            tx, ty = pos[j]
            cx, cy = {"left of": (tx - 300, ty), "right of": (tx + 300, ty),
                      "above": (tx, ty - 300), "below": (tx, ty + 300)}[rel]
        pos[i] = (cx, cy)
        for k in range(req["count"]):
            dets.append(det(req["class"], 0.95, cx, cy + 2 * k, color=req.get("color")))
    return dets


# ------------------------------------------------------------------ rewards


class TableDetector:
    """Returns prepared detections per image index, recording the class queries."""

    def __init__(self, table):
        self.table = table
        self.queries = []

    def __call__(self, images, classes):
        self.queries.append(classes)
        return [self.table[int(im[0, 0, 0])] for im in images]


def test_geneval_rewards_binary_and_dense():
    rows = [
        spec("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]),
        spec("counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}]),
        spec("single_object", [{"class": "dog", "count": 1}]),
    ]
    table = {0: [det("dog", 0.9, 10, 10)], 1: [det("cup", 0.95, 10, 10), det("cup", 0.95, 40, 10)], 2: []}
    images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(3)])
    detector = TableDetector(table)
    binary = build_reward("geneval", detector=detector)
    dense = build_reward("geneval_dense", detector=detector)
    meta = [json.dumps(r) for r in rows]  # TRL datasets carry the row as a JSON string
    out = binary(prompts=["a", "b", "c"], images=images, metadata=meta, completions=None, completion_ids=None)
    assert list(out) == [0.0, 1.0, 0.0]
    assert out.extras["tag/counting"] == [None, 1.0, None]
    assert detector.queries[0] == [["dog", "cat"], ["cup"], ["dog"]]
    assert list(dense(["a", "b", "c"], list(images), metadata=rows)) == [0.5, 1.0, 0.0]
    assert binary.__name__ == "geneval" and dense.__name__ == "geneval_dense"
    # prompts that are the GenEval rows themselves (a dict prompt column) serve as the metadata
    assert list(binary(prompts=rows, images=images)) == [0.0, 1.0, 0.0]
    # a row without metadata is "not applicable"
    assert list(binary(["a", "b"], images[:2], metadata=[None, rows[1]])) == [None, 1.0]


def test_geneval_reward_errors_name_reward_and_row():
    r = GenEvalReward(detector=TableDetector({0: []}))
    with pytest.raises(RewardError, match=r"reward 'geneval'.*metadata row 0: 'include'"):
        r(["a"], np.zeros((1, 4, 4, 3), np.uint8), metadata=[{"tag": "x"}])
    with pytest.raises(RewardError, match="metadata key 'metadata'"):
        r(["a"], np.zeros((1, 4, 4, 3), np.uint8))
