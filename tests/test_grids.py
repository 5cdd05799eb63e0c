"""argrpo.grids.image_grid: tiles land where they should, gaps stay white, text and frames take their own room."""

from __future__ import annotations

import numpy as np
import pytest
from argrpo.grids import as_rows, image_grid


def solid(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_as_rows_chunks_a_batch():
    batch = np.stack([solid(v) for v in range(5)])
    rows = as_rows(batch)  # ceil(sqrt(5)) = 3 per row
    assert [len(r) for r in rows] == [3, 2]
    assert [int(im[0, 0, 0]) for r in rows for im in r] == [0, 1, 2, 3, 4]
    assert [len(r) for r in as_rows(batch, cols=2)] == [2, 2, 1]


def test_tiles_and_gaps_exactly():
    rows = as_rows(np.stack([solid(v) for v in (10, 20, 30)]), cols=2)
    grid = image_grid(rows, gap=2)
    assert grid.shape == (4 + 2 + 4, 4 + 2 + 4, 3) and grid.dtype == np.uint8
    assert (grid[:4, :4] == 10).all() and (grid[:4, 6:] == 20).all() and (grid[6:, :4] == 30).all()
    assert (grid[4:6] == 255).all() and (grid[:, 4:6] == 255).all()  # the gaps
    assert (grid[6:, 6:] == 255).all()  # the short last row leaves white


def test_scale_and_tile_enlarge_by_nearest_neighbour():
    im = np.zeros((2, 2, 3), dtype=np.uint8)
    im[0, 1] = 200
    scaled = image_grid([[im]], scale=3)
    assert scaled.shape == (6, 6, 3)
    assert (scaled[:3, 3:] == 200).all() and (scaled[:3, :3] == 0).all()  # blocks, no blending
    assert image_grid([[im]], tile=8).shape == (8, 8, 3)


def test_frames_border_each_tile_in_its_colour():
    grid = image_grid([[solid(0), solid(0)]], gap=0, frames=[[(0, 255, 0), None]], frame_width=1)
    assert grid.shape == (6, 12, 3)
    assert (grid[0, :6] == (0, 255, 0)).all() and (grid[1:5, 1:5] == 0).all()
    assert (grid[0, 6:] == 255).all() and (grid[1:5, 7:11] == 0).all()  # no frame: white border


def test_text_takes_its_own_room():
    rows = [[solid(0), solid(0)], [solid(0), solid(0)]]
    plain = image_grid(rows)
    captioned = image_grid(rows, captions=["a red circle", "two squares"])
    labelled = image_grid(rows, labels=["a red circle", "two squares"])
    headed = image_grid(rows, headers=["sft", "grpo"])
    noted = image_grid(rows, notes=[[["R=1"], ["R=0", "x=1"]], [[], []]])
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
    assert headed.shape[1] == plain.shape[1] and headed.shape[0] > plain.shape[0]
    assert noted.shape[0] > headed.shape[0]  # two lines of notes under each row
    white = [[solid(255)]]
    assert (image_grid(white) == 255).all()
    assert (image_grid(white, captions=["a red circle"]) < 128).any()  # the caption is drawn


def test_empty_is_refused():
    with pytest.raises(ValueError, match="no images"):
        image_grid([])
