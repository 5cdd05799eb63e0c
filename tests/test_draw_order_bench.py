"""bench.draw_order's verdict on the object drawn first: which phrase it answers, and whether its colour is its own."""

from argrpo.data.shapes import spec_from_key
from argrpo.rewards.detectors.base import Detection

from bench.draw_order import first_object

SPEC = spec_from_key("color_attr", (("red", "circle"), ("blue", "square")))  # "a red circle and a blue square"


def _det(label, color, top, left):
    return Detection(label=label, score=1.0, box=(left, top, left + 16, top + 16), color=color)


def test_first_object_is_the_topmost_then_leftmost_box():
    # the square starts first (higher), in its own colour: drawn second-named first, bound right
    assert first_object(SPEC, [_det("circle", "red", 32, 0), _det("square", "blue", 8, 40)]) == (False, True)
    # same row: the left box comes first in raster order; a circle in the square's colour is bound wrong
    assert first_object(SPEC, [_det("square", "red", 8, 40), _det("circle", "blue", 8, 0)]) == (True, False)
    assert first_object(SPEC, [_det("circle", "red", 0, 0), _det("square", "blue", 40, 40)]) == (True, True)
    # a class the prompt does not name is neither; no detection at all is not counted
    assert first_object(SPEC, [_det("triangle", "red", 0, 0)]) == (False, False)
    assert first_object(SPEC, []) is None
