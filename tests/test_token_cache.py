import json

import numpy as np
import pytest
from argrpo.data.captions import CaptionSource, load_caption_dataset, load_images
from argrpo.data.shapes import ShapesWorld
from argrpo.data.token_cache import MARKER, build_token_cache, tokenizer_fingerprint
from argrpo.models.image_tokenizers import load_image_tokenizer
from argrpo.models.image_tokenizers.vq import VQTokenizer
from PIL import Image


class Counting:
    """An image tokenizer wrapper that counts encode calls (and can fail on demand)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after
        self.codebook_size, self.grid, self.image_size = inner.codebook_size, inner.grid, inner.image_size

    def encode(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed mid-encode")
        return self.inner.encode(images)

    def save_pretrained(self, path):
        self.inner.save_pretrained(path)


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    _, images, _ = ShapesWorld().sample("train", 200, seed=5)
    tok = VQTokenizer.fit(images)
    path = tmp_path_factory.mktemp("vq")
    tok.save_pretrained(path)
    return path


def test_encodes_once_then_hits_the_cache(vq, tmp_path):
    captions = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=40, shapes_seed=1))
    tok = Counting(load_image_tokenizer(vq))
    ds = build_token_cache(captions, tok, tmp_path, batch_size=16)
    assert tok.calls == 3  # 40 rows in batches of 16
    assert ds.column_names == ["caption", "codes"] and ds["caption"] == captions["caption"]
    codes = np.asarray(ds["codes"])
    assert codes.shape == (40, 64) and ds.features["codes"].feature.dtype == "int32"
    expect = tok.inner.encode(load_images(captions[:40], (64, 64))).reshape(40, -1).numpy()
    assert (codes == expect).all()
    # a later run (new tokenizer object loaded from the same files) reuses the Arrow cache
    again = Counting(load_image_tokenizer(vq))
    ds2 = build_token_cache(captions, again, tmp_path, batch_size=16)
    assert again.calls == 0 and (np.asarray(ds2["codes"]) == codes).all()
    dirs = [p for p in tmp_path.iterdir() if p.name.startswith("codes-")]
    assert len(dirs) == 1 and (dirs[0] / MARKER).is_file()


def test_changed_tokenizer_or_data_re_encodes(vq, tmp_path):
    captions = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=20, shapes_seed=2))
    build_token_cache(captions, Counting(load_image_tokenizer(vq)), tmp_path)
    # the same tokenizer with one colour of its codebook moved is a different tokenizer
    base = load_image_tokenizer(vq)
    colors = base.colors.clone()
    colors[0, 0] = 255 - colors[0, 0]
    changed = VQTokenizer(base.masks, colors, base.background, grid=base.grid)
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(load_image_tokenizer(vq))
    tok = Counting(changed)
    build_token_cache(captions, tok, tmp_path)
    assert tok.calls == 1
    # other source data (another seed) is another cache too
    other = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=20, shapes_seed=3))
    tok = Counting(load_image_tokenizer(vq))
    build_token_cache(other, tok, tmp_path)
    assert tok.calls == 1
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("codes-")]) == 3


def test_edited_image_file_re_encodes(vq, tmp_path):
    world = ShapesWorld()
    spec = world.make_specs("train", 1, seed=0)[0]
    img, _ = world.render(spec, 0)
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "caption": spec["prompt"]}) + "\n")
    src = CaptionSource(kind="jsonl", path=str(tmp_path / "d.jsonl"))
    tok = Counting(load_image_tokenizer(vq))
    first = build_token_cache(load_caption_dataset(src), tok, tmp_path / "cache")
    Image.fromarray(img[::-1].copy()).save(tmp_path / "a.png")  # flipped: new pixels under the same name
    second = build_token_cache(load_caption_dataset(src), tok, tmp_path / "cache")
    assert tok.calls == 2 and first["codes"] != second["codes"]


def test_interrupted_encode_leaves_no_cache(vq, tmp_path):
    captions = load_caption_dataset(CaptionSource(kind="shapes", shapes_n=48, shapes_seed=4))
    with pytest.raises(RuntimeError, match="killed"):
        build_token_cache(captions, Counting(load_image_tokenizer(vq), fail_after=1), tmp_path, batch_size=16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("codes-")]
    tok = Counting(load_image_tokenizer(vq))
    ds = build_token_cache(captions, tok, tmp_path, batch_size=16)
    assert tok.calls == 3 and len(ds) == 48
