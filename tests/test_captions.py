import json

import numpy as np
import pytest
from argrpo.data.captions import (
    CaptionDataError,
    CaptionSource,
    detailed_caption,
    heldout_prompts,
    load_caption_dataset,
    load_images,
    partial_captions,
    source_fingerprint,
)
from argrpo.data.shapes import ShapesWorld, spec_from_key
from PIL import Image


def _image(path, size=(64, 64), color=(200, 30, 30)):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = color
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", color=(255, 0, 0))
    _image(tmp_path / "img" / "b.png", size=(100, 80), color=(0, 0, 255))
    return tmp_path


def test_jsonl_rows_resolve_relative_paths_and_hash_content(folder):
    f = folder / "data.jsonl"
    f.write_text(json.dumps({"image": "img/a.png", "caption": "a red thing"}) + "\n\n"
                 + json.dumps({"image": str(folder / "img" / "b.png"), "caption": "a blue thing"}) + "\n")
    ds = load_caption_dataset(CaptionSource(kind="jsonl", path=str(f)))
    assert ds["caption"] == ["a red thing", "a blue thing"]
    assert ds["image_path"][0] == str((folder / "img" / "a.png").resolve())
    assert len(set(ds["image_sha"])) == 2
    images = load_images(ds[:2], (64, 64))
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    # the 100x80 image is centre-cropped to square then resized: still pure blue
    assert (images[1] == [0, 0, 255]).all() and (images[0] == [255, 0, 0]).all()


def test_parquet_source_with_custom_columns(folder):
    import datasets

    f = folder / "data.parquet"
    datasets.Dataset.from_dict({"file": ["img/a.png", "img/b.png"], "text": ["x", "y"]}).to_parquet(str(f))
    ds = load_caption_dataset(CaptionSource(kind="parquet", path=str(f), image_column="file", caption_column="text"))
    assert ds["caption"] == ["x", "y"]
    with pytest.raises(CaptionDataError, match="no column 'caption'"):
        load_caption_dataset(CaptionSource(kind="parquet", path=str(f), image_column="file"))


def test_imagefolder_metadata_and_sidecars(folder):
    img = folder / "img"
    (img / "a.txt").write_text("caption a\n")
    (img / "b.txt").write_text("caption b")
    ds = load_caption_dataset(CaptionSource(kind="imagefolder", path=str(img)))
    assert ds["caption"] == ["caption a", "caption b"]
    (img / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "caption": "from metadata"}) + "\n")
    ds = load_caption_dataset(CaptionSource(kind="imagefolder", path=str(img)))
    assert ds["caption"] == ["from metadata"] and ds["image_path"][0].endswith("b.png")


def test_missing_image_names_file_and_row(folder):
    f = folder / "data.jsonl"
    f.write_text(json.dumps({"image": "img/a.png", "caption": "ok"}) + "\n"
                 + json.dumps({"image": "img/missing.png", "caption": "gone"}) + "\n")
    with pytest.raises(CaptionDataError) as e:
        load_caption_dataset(CaptionSource(kind="jsonl", path=str(f)))
    msg = str(e.value)
    assert str(f) in msg and "row 1" in msg and "missing.png" in msg


@pytest.mark.parametrize("row", [{"image": "img/a.png"}, {"image": "img/a.png", "caption": None},
                                 {"caption": "no image"}])
def test_missing_caption_or_image_field_names_row(folder, row):
    f = folder / "data.jsonl"
    f.write_text(json.dumps({"image": "img/b.png", "caption": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(CaptionDataError, match=r"data\.jsonl: row 1: missing"):
        load_caption_dataset(CaptionSource(kind="jsonl", path=str(f)))


def test_bad_json_line_and_missing_sidecar(folder):
    f = folder / "data.jsonl"
    f.write_text('{"image": "img/a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(CaptionDataError, match="row 2: not valid JSON"):
        load_caption_dataset(CaptionSource(kind="jsonl", path=str(f)))
    (folder / "img" / "a.txt").write_text("only a")
    with pytest.raises(CaptionDataError, match=r"missing caption file .*b\.txt"):
        load_caption_dataset(CaptionSource(kind="imagefolder", path=str(folder / "img")))


def test_config_checks():
    with pytest.raises(ValueError, match="data.kind"):
        CaptionSource(kind="webdataset")
    with pytest.raises(ValueError, match="data.path is required"):
        CaptionSource(kind="jsonl")
    with pytest.raises(ValueError, match="summing to <= 1"):
        CaptionSource(shapes_mixed_full=0.8, shapes_mixed_detailed=0.5)


def test_fingerprint_follows_image_bytes_and_captions(folder):
    f = folder / "data.jsonl"
    f.write_text(json.dumps({"image": "img/a.png", "caption": "x"}) + "\n")
    src = CaptionSource(kind="jsonl", path=str(f))
    fp = source_fingerprint(load_caption_dataset(src))
    assert source_fingerprint(load_caption_dataset(src)) == fp
    _image(folder / "img" / "a.png", color=(0, 255, 0))  # same path, new pixels
    fp2 = source_fingerprint(load_caption_dataset(src))
    assert fp2 != fp
    f.write_text(json.dumps({"image": "img/a.png", "caption": "y"}) + "\n")
    assert source_fingerprint(load_caption_dataset(src)) not in (fp, fp2)


def test_shapes_prompt_captions_render_their_spec():
    ds = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=24, shapes_seed=3))
    specs = [json.loads(s) for s in ds["spec"]]
    assert ds["caption"] == [s["prompt"] for s in specs]
    assert {s["tag"] for s in specs} == {"single_object", "two_object", "counting", "colors", "position",
                                         "color_attr"}
    world = ShapesWorld()
    images = load_images(ds[:4], (64, 64))
    for i in range(4):
        expect, _ = world.render(specs[i], ds["render_seed"][i])
        assert (images[i] == expect).all()
    with pytest.raises(CaptionDataError, match="expects"):
        load_images(ds[:1], (32, 32))


def test_shapes_mixed_captions_are_true_and_never_heldout():
    world = ShapesWorld()
    ds = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=600, shapes_captions="mixed"))
    specs = [json.loads(s) for s in ds["spec"]]
    full = np.mean([c == s["prompt"] for c, s in zip(ds["caption"], specs)])
    assert 0.4 < full < 0.75  # half kept, plus derived captions that happen to equal the prompt
    assert not set(ds["caption"]) & heldout_prompts(world)
    vocab = set(world.vocabulary())
    assert all(set(c.split()) <= vocab for c in ds["caption"])
    # colour words named in a caption are colours the render really has
    for c, spec, seed in list(zip(ds["caption"], specs, ds["render_seed"]))[:200]:
        _, record = world.render(spec, seed)
        named = set(c.split()) & set(world.colors)
        assert named <= {o["color"] for o in record["objects"]}, (c, record)


def test_partial_and_detailed_captions():
    spec = spec_from_key("color_attr", (("red", "circle"), ("blue", "square")))
    parts = partial_captions(spec)
    assert "a photo of a red circle" in parts and "a photo of a circle and a square" in parts
    assert spec["prompt"] not in parts
    counting = spec_from_key("counting", ("triangle", 3))
    assert all("three" in p or "two" not in p for p in partial_captions(counting))
    assert "a photo of a triangle" not in partial_captions(counting)  # one triangle would be a wrong count
    two = spec_from_key("two_object", ("circle", "square"))
    record = {"objects": [{"include": 0, "color": "green"}, {"include": 1, "color": "purple"}]}
    assert detailed_caption(two, record) == "a photo of a green circle and a purple square"
    assert detailed_caption(two, record, heldout_pairs={("green", "circle")}) == \
        "a photo of a circle and a purple square"
