"""PNG grids: size follows the layout; attribution bars use each source's colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.errors import DataError
from cdm.viz import colour, save_grid


def test_grid_without_attribution(tmp_path: Path) -> None:
    imgs = np.full((6, 8, 8), 200, dtype=np.uint8)
    p = save_grid(imgs, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(p) as im:
        assert im.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)
        assert im.getpixel((2, 2)) == (200, 200, 200)


def test_grid_with_attribution_draws_source_colours(tmp_path: Path) -> None:
    imgs = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    att = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = save_grid(imgs, tmp_path / "a.png", nrow=2, scale=4, attribution=att, source_names=["tops", "bags"])
    with Image.open(p) as im:
        rgb = im.convert("RGB")
    # the bar under image 0 is source 0's colour, under image 1 source 1's
    assert rgb.getpixel((2 + 5, 2 + 32 + 1)) == colour(0)
    assert rgb.getpixel((2 + 34 + 5, 2 + 32 + 1)) == colour(1)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint8"):
        save_grid(np.zeros((2, 4, 4), dtype=np.float32), tmp_path / "x.png")
    with pytest.raises(DataError, match="attribution"):
        save_grid(np.zeros((2, 4, 4), dtype=np.uint8), tmp_path / "x.png", attribution=np.ones((3, 2)))


def test_tiny_and_fractional_shares_do_not_break_the_bars(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    att = rng.dirichlet([0.3] * 4, size=16)
    att[0] = [0.49, 0.01, 0.25, 0.25]
    save_grid(np.zeros((16, 8, 8), dtype=np.uint8), tmp_path / "f.png", attribution=att, scale=3)
    with Image.open(tmp_path / "f.png") as im:
        assert im.size[1] > 4 * 8 * 3
