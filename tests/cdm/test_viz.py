"""PNG grids: size follows the layout; attribution bars use each source's colour, derived from its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.errors import DataError
from cdm.viz import PALETTE, grid_image, save_grid, source_colour, source_colour_hex


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
    # the bar under image 0 is the colour of "tops", under image 1 that of "bags"
    assert source_colour("tops") != source_colour("bags")
    assert rgb.getpixel((2 + 5, 2 + 32 + 1)) == source_colour("tops")
    assert rgb.getpixel((2 + 34 + 5, 2 + 32 + 1)) == source_colour("bags")


def test_a_source_keeps_its_colour_when_another_is_forgotten() -> None:
    imgs = np.zeros((1, 8, 8), dtype=np.uint8)

    def bar_colours(names: list[str]) -> dict[str, tuple[int, int, int]]:
        """Each source's colour as drawn: one image, all weight on that source, bar pixel read back."""
        out = {}
        for k, name in enumerate(names):
            att = np.zeros((1, len(names)))
            att[0, k] = 1.0
            im = grid_image(imgs, nrow=1, scale=4, attribution=att, source_names=names).convert("RGB")
            out[name] = im.getpixel((2 + 16, 2 + 32 + 1))
        return out

    before = bar_colours(["alpha", "beta", "gamma"])
    after = bar_colours(["alpha", "gamma"])  # beta forgotten: gamma moves from column 2 to column 1
    assert after == {"alpha": before["alpha"], "gamma": before["gamma"]}
    assert before == {n: source_colour(n) for n in ("alpha", "beta", "gamma")}


def test_source_colours_are_stable_and_from_the_palette() -> None:
    names = [f"source-{i}" for i in range(200)]
    colours = [source_colour(n) for n in names]
    assert all(c in PALETTE for c in colours)
    assert len(set(colours)) == len(PALETTE)  # 200 names reach every colour: the hash spreads
    # fixed by the name alone (sha256), so it is the same in every process and release
    assert source_colour("alpha") == (0x00, 0x67, 0xA5) and source_colour_hex("alpha") == "#0067a5"
    assert source_colour_hex("gamma") == "#" + bytes(source_colour("gamma")).hex()


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
