"""The demo's side-by-side picture: long titles wrap inside the picture."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from tokenreduce.demo import side_by_side, wrap

TITLE = "a model: ToMA toma-sdxl (r=0.5, merges 10/20 steps; 1.15x per generation at 1024x1024 on a GPU)"


def test_wrap_breaks_at_spaces_within_the_width() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap(draw, TITLE, 150)
    assert len(lines) > 1 and " ".join(lines) == TITLE
    assert all(draw.textlength(line) <= 150 for line in lines)
    assert wrap(draw, "unbreakable-word-longer-than-the-width", 10) == [
        "unbreakable-word-longer-than-the-width"
    ]


def test_long_titles_stay_inside_the_picture() -> None:
    panel = np.full((8, 8, 3), 255, dtype=np.uint8)
    picture = side_by_side([(TITLE, [("one", panel), ("two", panel)])], scale=4)
    assert picture.width == 2 * 32 + 3 * 8  # as wide as its panels: the title wraps
    assert ImageDraw.Draw(picture).textlength(TITLE) > picture.width
    inked = np.flatnonzero((np.asarray(picture.convert("L")) < 128).any(axis=0))
    assert inked.max() < picture.width - 8  # the text keeps the right margin (8 px): nothing is clipped
