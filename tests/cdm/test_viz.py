"""PNG grids: size follows the layout; attribution bars use each source's colour, derived from its name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.errors import DataError
from cdm.viz import PALETTE, grid_image, save_grid, source_colour, source_colour_hex


def test_grid_without_attribution_places_image_i_at_row_i_div_nrow_column_i_mod_nrow(tmp_path: Path) -> None:
    imgs = np.stack([np.full((8, 8), 10 + 40 * i, dtype=np.uint8) for i in range(5)])
    imgs[0, 0, 0] = 200  # one marked pixel: the top-left of image 0, scaled to a 2x2 block
    p = save_grid(imgs, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(p) as im:
        rgb = im.convert("RGB")
    assert rgb.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    for i in range(5):
        r, c = divmod(i, 3)
        x, y = 2 + c * 18, 2 + r * 18
        v = 10 + 40 * i
        assert rgb.getpixel((x + 15, y + 15)) == (v, v, v), f"image {i} is not in cell ({r}, {c})"
        assert rgb.getpixel((x - 1, y - 1)) == (255, 255, 255)  # padding stays white
    assert rgb.getpixel((2, 2)) == rgb.getpixel((3, 3)) == (200, 200, 200) and rgb.getpixel((4, 4)) == (10, 10, 10)
    assert rgb.getpixel((2 + 2 * 18 + 5, 2 + 18 + 5)) == (255, 255, 255)  # cell 5 of 6 is empty


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
    names = ["alpha", "beta", "gamma", "delta"]
    colours = [source_colour(n) for n in names]
    assert len(set(colours)) == 4, "the test needs four distinct colours"
    scale, cw, ch, bar = 3, 24, 24, 6
    save_grid(
        np.zeros((16, 8, 8), dtype=np.uint8), tmp_path / "f.png", attribution=att, scale=scale, source_names=names
    )
    with Image.open(tmp_path / "f.png") as im:
        rgb = im.convert("RGB")
    assert rgb.size[1] > 4 * (ch + bar + 2)  # a legend below the grid
    for i in range(16):
        r, c = divmod(i, 4)  # 16 images: a 4 x 4 grid
        x, y = 2 + c * (cw + 2), 2 + r * (ch + bar + 2)
        drawn = [rgb.getpixel((x + px, y + ch + bar // 2)) for px in range(cw)]
        assert all(d in colours for d in drawn), f"bar {i} has pixels outside the sources' colours"
        # each source covers its share of the width (to a pixel of rounding), in column order left to right
        for k, colour in enumerate(colours):
            assert abs(drawn.count(colour) - att[i, k] / att[i].sum() * cw) <= 1, (i, names[k])
        order = [colours.index(d) for d in drawn]
        assert order == sorted(order), f"bar {i} is not in column order: {order}"
    # image 0: gamma and delta each 6 px, beta's 1 % (0.24 px) vanishes rather than breaking the bar
    first = [rgb.getpixel((2 + px, 2 + ch + 1)) for px in range(cw)]
    assert first[-6:] == [colours[3]] * 6 and first[-12:-6] == [colours[2]] * 6 and colours[1] not in first
