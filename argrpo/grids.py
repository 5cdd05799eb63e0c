"""Image grids, built in one place for every figure argrpo writes: sample sheets, training-batch grids, evaluation
grids framed by verdict, and the stage-comparison grid of the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
TEXT: Color = (0, 0, 0)
NOTE: Color = (20, 20, 120)


def as_rows(images, cols: int | None = None) -> list[list[np.ndarray]]:
    """A flat batch (uint8 ``[n, H, W, 3]`` or a list of ``[H, W, 3]``) -> rows of ``cols`` images
    (default ``ceil(sqrt(n))``); the last row may be shorter."""
    items = list(images)
    cols = cols or max(1, math.ceil(math.sqrt(len(items))))
    return [items[i : i + cols] for i in range(0, len(items), cols)]


def _font(size: int | None):
    from PIL import ImageFont

    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size only
        return ImageFont.load_default()


def image_grid(rows: Sequence[Sequence[np.ndarray]], *, scale: int = 1, tile: int | None = None, gap: int = 2,
               captions: Sequence[str] | None = None, labels: Sequence[str] | None = None,
               headers: Sequence[str] | None = None, notes: Sequence[Sequence[Sequence[str]]] | None = None,
               frames: Sequence[Sequence[Color | None]] | None = None, frame_width: int = 2,
               font_size: int | None = None) -> np.ndarray:
    """Rows of images -> one uint8 image ``[H', W', 3]`` on white.

    rows: R rows of uint8 ``[H, W, 3]`` images (all the size of the first), rows may be shorter than the longest.
    Each image is drawn at ``scale`` times its size, or resized to ``tile`` x ``tile`` (nearest neighbour when
    enlarging, so codes stay visible as blocks), ``gap`` px apart. Optional text and marks, each indexed like the
    images: ``captions[r]`` (a line above row r), ``labels[r]`` (left of row r), ``headers[c]`` (above column c),
    ``notes[r][c]`` (lines under image (r, c)), ``frames[r][c]`` (a ``frame_width`` border of that colour; None:
    none). Without text the grid is exactly the tiles and the gaps.
    """
    from PIL import Image, ImageDraw

    if not rows or not any(len(r) for r in rows):
        raise ValueError("image_grid: no images")
    first = np.asarray(next(im for r in rows for im in r))
    h, w = first.shape[:2]
    tw, th = (tile, tile) if tile else (w * scale, h * scale)
    fw = frame_width if frames is not None else 0
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    n_cols = max(len(r) for r in rows)
    label_w = max(probe.textlength(t, font=font) for t in labels) + 8 if labels else 0
    header_h = line_h + 2 if headers else 0
    caption_h = line_h + 2 if captions else 0
    notes_h = line_h * max((len(n) for r in notes for n in r), default=0) + 2 if notes else 0
    cell_w, cell_h = tw + 2 * fw, th + 2 * fw
    row_h = caption_h + cell_h + notes_h
    width = int(label_w) + n_cols * cell_w + (n_cols - 1) * gap
    height = header_h + len(rows) * row_h + (len(rows) - 1) * gap
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    x0 = int(label_w)
    for c, text in enumerate(headers or []):
        if text:
            draw.text((x0 + c * (cell_w + gap) + 2, 1), text, fill=TEXT, font=font)
    for r, row in enumerate(rows):
        y = header_h + r * (row_h + gap)
        if captions:
            draw.text((x0 + 2, y + 1), captions[r], fill=TEXT, font=font)
        if labels:
            draw.text((4, y + caption_h + cell_h // 2 - line_h // 2), labels[r], fill=TEXT, font=font)
        for c, im in enumerate(row):
            x, yt = x0 + c * (cell_w + gap), y + caption_h
            color = frames[r][c] if frames is not None else None
            if color is not None:
                draw.rectangle([x, yt, x + cell_w - 1, yt + cell_h - 1], fill=tuple(color))
            pic = Image.fromarray(np.asarray(im, dtype=np.uint8))
            if pic.size != (tw, th):
                pic = pic.resize((tw, th), Image.NEAREST if tw >= pic.width else Image.BILINEAR)
            canvas.paste(pic, (x + fw, yt + fw))
            for j, text in enumerate(notes[r][c] if notes else ()):
                draw.text((x, yt + cell_h + 1 + j * line_h), text, fill=NOTE, font=font)
    return np.asarray(canvas)
