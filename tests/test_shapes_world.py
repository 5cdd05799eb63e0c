"""The shapes world: GenEval schema and phrasing, deterministic renders that satisfy their specs, held-out split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from argrpo.data.prompts import PromptFileError, read_prompts, write_prompts
from argrpo.data.shapes import (
    PALETTE,
    RELATIONS,
    TAGS,
    ShapesWorld,
    blur_and_noise,
    perturb_spec,
    prompt_for,
    record_detections,
    shape_mask,
    spec_from_key,
    vocabulary,
    write_prompt_sets,
)
from argrpo.rewards.detectors.shapes import SHAPE_MASKS
from argrpo.rewards.geneval import relative_position, score_image

WORLD = ShapesWorld()

# GenEval's metadata (djghosh13/geneval evaluation_metadata.jsonl): keys of each include entry per tag.
GENEVAL_INCLUDE_KEYS = {
    "single_object": [{"class", "count"}],
    "two_object": [{"class", "count"}, {"class", "count"}],
    "counting": [{"class", "count"}],
    "colors": [{"class", "count", "color"}],
    "position": [{"class", "count"}, {"class", "count", "position"}],
    "color_attr": [{"class", "count", "color"}, {"class", "count", "color"}],
}


def _specs(world=WORLD, per_tag=20, seed=0):
    """Specs of both splits, ``per_tag`` of each tag per split."""
    return [s for split in ("train", "heldout") for s in world.make_specs(split, per_tag * len(TAGS), seed)]


# ---- schema and phrasing -------------------------------------------------------------------------------------------
def test_specs_follow_geneval_schema():
    for spec in _specs(per_tag=10):
        tag = spec["tag"]
        assert [set(r) for r in spec["include"]] == GENEVAL_INCLUDE_KEYS[tag], spec
        assert set(spec) == ({"tag", "include", "prompt", "exclude"} if tag == "counting" else
                             {"tag", "include", "prompt"})
        inc = spec["include"]
        assert all(r["class"] in WORLD.shapes for r in inc)
        if tag == "counting":
            assert 2 <= inc[0]["count"] <= 4
            assert spec["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        else:
            assert all(r["count"] == 1 for r in inc)
        if tag == "position":
            assert inc[1]["position"][0] in RELATIONS and inc[1]["position"][1] == 0
        if len(inc) == 2:
            assert inc[0]["class"] != inc[1]["class"]
        if tag == "color_attr":
            assert inc[0]["color"] != inc[1]["color"]
        assert spec["prompt"] == prompt_for(spec)
        json.dumps(spec)  # plain JSON types only


def test_prompts_are_phrased_like_geneval():
    assert spec_from_key("single_object", ("circle",))["prompt"] == "a photo of a circle"
    assert spec_from_key("counting", ("circle", 2))["prompt"] == "a photo of two circles"
    assert spec_from_key("counting", ("triangle", 4))["prompt"] == "a photo of four triangles"
    assert spec_from_key("colors", ("blue", "square"))["prompt"] == "a photo of a blue square"
    assert spec_from_key("colors", ("orange", "circle"))["prompt"] == "a photo of an orange circle"
    assert spec_from_key("two_object", ("circle", "square"))["prompt"] == "a photo of a circle and a square"
    pos = spec_from_key("position", ("square", "left of", "triangle"))
    assert pos["prompt"] == "a photo of a square left of a triangle"
    assert pos["include"] == [{"class": "triangle", "count": 1},
                              {"class": "square", "count": 1, "position": ["left of", 0]}]
    attr = spec_from_key("color_attr", (("purple", "circle"), ("red", "triangle")))
    assert attr["prompt"] == "a photo of a purple circle and a red triangle"
    # colour and position together (GenEval's schema allows both on one entry)
    both = {"tag": "position", "include": [{"class": "triangle", "count": 1, "color": "green"},
                                           {"class": "square", "count": 1, "color": "blue",
                                            "position": ["left of", 0]}]}
    assert prompt_for(both) == "a photo of a blue square left of a green triangle"


def test_vocabulary_covers_every_prompt():
    vocab = set(vocabulary())
    assert vocab == set(WORLD.vocabulary())
    for tag in TAGS:
        for key in WORLD.compositions(tag):
            words = spec_from_key(tag, key)["prompt"].split()
            assert set(words) <= vocab, words
    assert {"left", "right", "above", "below", "two", "three", "four", "an"} <= vocab
    assert len(vocab) == len(WORLD.vocabulary())  # no duplicates


# ---- determinism ---------------------------------------------------------------------------------------------------
def test_same_seed_same_specs_and_images():
    a = WORLD.sample("train", 30, seed=5)
    b = WORLD.sample("train", 30, seed=5)
    assert a[0] == b[0] and a[2] == b[2]
    assert np.array_equal(a[1], b[1])
    c = WORLD.sample("train", 30, seed=6)
    assert c[0] != a[0] and not np.array_equal(c[1], a[1])
    spec = a[0][0]
    assert np.array_equal(WORLD.render(spec, 11)[0], WORLD.render(spec, 11)[0])
    assert not all(np.array_equal(WORLD.render(spec, 11)[0], WORLD.render(spec, s)[0]) for s in range(12, 16))


def test_tags_are_balanced():
    counts = Counter(s["tag"] for s in WORLD.make_specs("train", 600, 0))
    assert counts == {t: 100 for t in TAGS}


# ---- renders -------------------------------------------------------------------------------------------------------
def _redraw(world, record):
    img = np.empty((world.image_size, world.image_size, 3), np.uint8)
    img[:] = world.background
    for o in record["objects"]:
        x0, y0, x1, y1 = o["box"]
        img[y0:y1, x0:x1][shape_mask(o["class"], x1 - x0, y1 - y0)] = PALETTE[o["color"]]
    return img


@pytest.mark.parametrize("world", [WORLD, ShapesWorld(shapes=tuple(SHAPE_MASKS), colors=tuple(PALETTE)),
                                   ShapesWorld(object_order="named")],
                         ids=["default", "5shapes-10colours", "named-order"])
def test_render_satisfies_its_spec_for_every_tag(world):
    specs = _specs(world, per_tag=15, seed=1)
    assert Counter(s["tag"] for s in specs) == {t: 30 for t in TAGS}
    for j, spec in enumerate(specs):
        img, rec = world.render(spec, seed=j)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        objs = rec["objects"]
        # exactly the included objects: class and count per include entry, colour where given
        assert len(objs) == sum(r["count"] for r in spec["include"])
        for i, req in enumerate(spec["include"]):
            mine = [o for o in objs if o["include"] == i]
            assert len(mine) == req["count"] and all(o["class"] == req["class"] for o in mine)
            if "color" in req:
                assert all(o["color"] == req["color"] for o in mine)
            if "position" in req:
                rel, target = req["position"]
                for o in mine:
                    for t in (t for t in objs if t["include"] == target):
                        # the relation holds, and no other (so a wrong relation is judged wrong)
                        assert relative_position(o["box"], t["box"]) == {rel}, (spec["prompt"], o, t)
        # boxes on the cell grid, sizes from the world, inside the image, never overlapping (gap kept)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 == y1 - y0 and x1 - x0 in world.sizes
            assert all(v % world.cell == 0 for v in o["box"]) and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            assert o["color"] in world.colors
        g = world.gap * world.cell
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = objs[a]["box"], objs[b]["box"]
                assert ax1 + g <= bx0 or bx1 + g <= ax0 or ay1 + g <= by0 or by1 + g <= ay0, (objs[a], objs[b])
        # the pixels are exactly the recorded objects on the background
        assert np.array_equal(img, _redraw(world, rec))
        ok, details = score_image(spec, record_detections(rec))
        assert ok, (spec["prompt"], details["reasons"])


def test_named_order_hands_the_same_boxes_to_the_objects_in_the_order_named():
    named = ShapesWorld(object_order="named")
    first_named_first = Counter()
    for tag in ("two_object", "color_attr", "counting", "position"):
        for j, spec in enumerate(WORLD.make_specs("train", 40, seed=2, tags=(tag,))):
            img, rec = named.render(spec, seed=j)
            _, rec0 = WORLD.render(spec, seed=j)
            # the random world's places, only handed out differently (so the two worlds' images hold the same boxes)
            assert sorted(o["cells"] for o in rec["objects"]) == sorted(o["cells"] for o in rec0["objects"])
            if tag == "position":  # a position clause fixes who goes where: left as the random world drew it
                assert rec == rec0
                continue
            starts = [o["cells"][:2] for o in rec["objects"]]
            assert starts == sorted(starts), (spec["prompt"], starts)  # raster order follows the include order
            assert [o["include"] for o in rec["objects"]] == sorted(o["include"] for o in rec["objects"])
            ok, details = score_image(spec, record_detections(rec))
            assert ok, (spec["prompt"], details["reasons"])
            if tag != "counting":
                first = min(rec0["objects"], key=lambda o: o["cells"][:2])
                first_named_first[tag] += first["include"] == 0
    # without the option the object named second comes first about half the time
    assert all(10 <= n <= 30 for n in first_named_first.values()), first_named_first


def test_perturbed_specs_are_not_satisfied():
    rng = np.random.default_rng(0)
    kinds = Counter()
    for j, spec in enumerate(_specs(per_tag=15, seed=2)):
        _, rec = WORLD.render(spec, seed=j)
        bad = perturb_spec(WORLD, spec, rng)
        assert bad["prompt"] != spec["prompt"] and bad["tag"] == spec["tag"]
        ok, _ = score_image(bad, record_detections(rec))
        assert not ok, (spec["prompt"], "->", bad["prompt"])
        kinds[next(k for k in ("class", "color", "count", "position") if _changed(spec, bad, k))] += 1
    assert set(kinds) == {"class", "color", "count", "position"}


def test_perturbation_of_a_chosen_attribute_changes_only_it():
    rng = np.random.default_rng(1)
    wanted = {"colors": "color", "counting": "count", "position": "position", "two_object": "class"}
    for j, spec in enumerate(s for s in _specs(per_tag=6, seed=3) if s["tag"] in wanted):
        kind = wanted[spec["tag"]]
        bad = perturb_spec(WORLD, spec, rng, kind=kind)
        assert [k for k in ("class", "color", "count", "position") if _changed(spec, bad, k)] == [kind]
        ok, _ = score_image(bad, record_detections(WORLD.render(spec, seed=j)[1]))
        assert not ok, (spec["prompt"], "->", bad["prompt"])
    single = next(s for s in _specs(per_tag=1, seed=0) if s["tag"] == "single_object")
    with pytest.raises(ValueError, match="no 'color' to change"):
        perturb_spec(WORLD, single, rng, kind="color")


def _changed(a, b, key):
    return [r.get(key) for r in a["include"]] != [r.get(key) for r in b["include"]]


def test_render_rejects_bad_specs():
    with pytest.raises(ValueError, match="class 'hexagon'"):
        WORLD.render({"tag": "single_object", "include": [{"class": "hexagon", "count": 1}], "prompt": "x"}, 0)
    with pytest.raises(ValueError, match="color 'pink'"):
        WORLD.render({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}]}, 0)
    with pytest.raises(ValueError, match="position"):
        WORLD.render({"tag": "position", "include": [{"class": "circle", "count": 1,
                                                      "position": ["left of", 0]}]}, 0)
    with pytest.raises(ValueError, match="more than 4 objects"):
        WORLD.render({"tag": "counting", "include": [{"class": "circle", "count": 4},
                                                     {"class": "square", "count": 1}]}, 0)


def test_world_settings_are_checked():
    with pytest.raises(ValueError, match="shapes"):
        ShapesWorld(shapes=("circle", "square"))
    with pytest.raises(ValueError, match="colors"):
        ShapesWorld(colors=("red", "blue", "green", "teal", "pink", "white"))
    with pytest.raises(ValueError, match="sizes"):
        ShapesWorld(sizes=(12,))
    with pytest.raises(ValueError, match="background"):
        ShapesWorld(colors=("red", "orange", "yellow", "green", "blue", "white"), background=PALETTE["white"])
    with pytest.raises(ValueError, match="object_order"):
        ShapesWorld(object_order="sorted")
    w = ShapesWorld(shapes=["circle", "square", "triangle"], background=[0, 0, 0],
                    colors=["red", "orange", "yellow", "green", "blue", "white"])  # lists from JSON are fine
    assert w.shapes == ("circle", "square", "triangle") and w.background == (0, 0, 0)


# ---- splits and prompt sets ----------------------------------------------------------------------------------------
def test_heldout_compositions_never_appear_in_training():
    train_prompts, held_prompts = set(), set()
    for tag in TAGS:
        train = WORLD.split_compositions("train", tag)
        held = WORLD.split_compositions("heldout", tag)
        assert train and held, tag
        assert not set(train) & set(held) and len(train) + len(held) == len(WORLD.compositions(tag))
        train_prompts |= {spec_from_key(tag, k)["prompt"] for k in train}
        held_prompts |= {spec_from_key(tag, k)["prompt"] for k in held}
    assert not train_prompts & held_prompts
    # no held-out (colour, class) pair is ever named in a training prompt
    for spec in WORLD.make_specs("train", 600, 0):
        for r in spec["include"]:
            if "color" in r:
                assert (r["color"], r["class"]) not in WORLD.heldout_pairs
    for spec in WORLD.make_specs("heldout", 120, 0):
        assert spec["prompt"] in held_prompts


def test_write_prompt_sets(tmp_path):
    paths = write_prompt_sets(tmp_path, heldout_per_tag=20, train_per_tag=50)
    assert set(paths) == {"train", "heldout"}
    train, held = read_prompts(paths["train"]), read_prompts(paths["heldout"])
    assert len(held) >= 100 and Counter(s["tag"] for s in held) == {t: 20 for t in TAGS}
    assert Counter(s["tag"] for s in train) == {t: 50 for t in TAGS}
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in held}
    # rows spread over the compositions: all of a tag's held-out compositions appear before any repeats
    for tag in TAGS:
        n_comp = len(WORLD.split_compositions("heldout", tag))
        assert len({s["prompt"] for s in held if s["tag"] == tag}) == min(20, n_comp)
    # rows are plain GenEval jsonl
    first = json.loads(paths["heldout"].read_text().splitlines()[0])
    assert set(first) <= {"tag", "include", "exclude", "prompt"}


def test_prompt_files_name_the_bad_row(tmp_path):
    good = spec_from_key("colors", ("red", "circle"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl: row 2: not valid JSON"):
        read_prompts(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"tag": "colors", "prompt": "x"}) + "\n")
    with pytest.raises(PromptFileError, match=r"row 3: missing key 'include'"):
        read_prompts(path)
    bad_pos = {"tag": "position", "prompt": "x", "include": [{"class": "a", "count": 1, "position": ["near", 0]}]}
    path.write_text(json.dumps(bad_pos) + "\n")
    with pytest.raises(PromptFileError, match=r"row 1: include\[0\]: 'position'"):
        read_prompts(path)
    path.write_text(json.dumps({**good, "include": [{"class": "circle", "count": "2"}]}) + "\n")
    with pytest.raises(PromptFileError, match="'count' must be a positive int"):
        read_prompts(path)
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(PromptFileError, match="row 2"):
        write_prompts(tmp_path / "out.jsonl", [good, {"tag": "x"}])
    assert not (tmp_path / "out.jsonl").exists()


# ---- datasets and corruptions --------------------------------------------------------------------------------------
def test_build_dataset_rows_are_the_renders():
    ds = WORLD.build_dataset("heldout", 12, seed=3)
    assert ds.column_names == ["prompt", "tag", "metadata", "seed", "image"]
    assert len(ds) == 12
    specs = WORLD.make_specs("heldout", 12, 3)
    for row, spec in zip(ds, specs):
        assert json.loads(row["metadata"]) == spec and row["prompt"] == spec["prompt"]
        assert np.array_equal(np.asarray(row["image"]), WORLD.render(spec, row["seed"])[0])


def test_blur_and_noise():
    _, imgs, _ = WORLD.sample("train", 4, 0)
    assert np.array_equal(blur_and_noise(imgs), imgs)
    a = blur_and_noise(imgs, 0.7, 8, seed=1)
    assert a.shape == imgs.shape and a.dtype == np.uint8
    assert np.array_equal(a, blur_and_noise(imgs, 0.7, 8, seed=1))
    assert not np.array_equal(a, blur_and_noise(imgs, 0.7, 8, seed=2))
    # blur keeps flat regions flat: the background far from objects is untouched without noise
    b = blur_and_noise(imgs, 0.7, 0)
    assert 0 < np.mean(b != imgs) < 0.2
