"""PNG sample grids, optionally with a stacked attribution bar (one colour per source) under each image.

A source's colour is derived from its NAME (``source_colour``), never from its position among the sources shown,
so it is the same in every grid, legend and status page (api/ui), and it does not change when another source
is added or forgotten.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cdm.errors import DataError
from cdm.fsio import write_atomic

# Kelly's 22 colours of maximum contrast (K. L. Kelly, "Twenty-two colors for maximum contrast", Color
# Engineering 3(6), 1965) less white and black (the page and the text) and buff and greenish yellow (too faint on
# white): 18 colours that stay distinct to the eye on the grids and the status pages.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0xF3, 0xC3, 0x00), (0x87, 0x56, 0x92), (0xF3, 0x84, 0x00), (0xA1, 0xCA, 0xF1), (0xBE, 0x00, 0x32),
    (0x84, 0x84, 0x82), (0x00, 0x88, 0x56), (0xE6, 0x8F, 0xAC), (0x00, 0x67, 0xA5), (0xF9, 0x93, 0x79),
    (0x60, 0x4E, 0x97), (0xF6, 0xA6, 0x00), (0xB3, 0x44, 0x6C), (0x88, 0x2D, 0x17), (0x8D, 0xB6, 0x00),
    (0x65, 0x45, 0x22), (0xE2, 0x58, 0x22), (0x2B, 0x3D, 0x26),
)  # fmt: skip


def source_colour(name: str) -> tuple[int, int, int]:
    """The colour of source ``name``: sha256 of the name into ``PALETTE``.

    Stable across processes, pages and grids, and independent of the other sources shown (so forgetting one
    never recolours another). With 18 colours two sources can share one; legends always name them.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return PALETTE[int.from_bytes(digest[:8], "big") % len(PALETTE)]


def source_colour_hex(name: str) -> str:
    """``source_colour`` as CSS ``#rrggbb`` (the status pages' swatches and bars)."""
    r, g, b = source_colour(name)
    return f"#{r:02x}{g:02x}{b:02x}"


def save_grid(
    images: np.ndarray,
    path: Path | str,
    *,
    nrow: int | None = None,
    scale: int = 4,
    attribution: np.ndarray | None = None,
    source_names: Sequence[str] | None = None,
) -> Path:
    """Write uint8 images (N,H,W[,C]) as a PNG grid; with ``attribution`` (N,K) add bars and a legend.

    Column k of ``attribution`` is source ``source_names[k]`` (default ``"source k"``) and is drawn in its colour.
    """
    canvas = grid_image(images, nrow=nrow, scale=scale, attribution=attribution, source_names=source_names)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: canvas.save(f, format="PNG"))
    return out


def grid_png(
    images: np.ndarray,
    *,
    nrow: int | None = None,
    scale: int = 4,
    attribution: np.ndarray | None = None,
    source_names: Sequence[str] | None = None,
) -> bytes:
    """``save_grid``'s PNG as bytes (for HTTP responses)."""
    canvas = grid_image(images, nrow=nrow, scale=scale, attribution=attribution, source_names=source_names)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def image_png(image: np.ndarray) -> bytes:
    """One uint8 image (H,W[,C]) with C in (1, 3) as PNG bytes, at its own size."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3)):
        raise DataError(f"image must be uint8 (H,W), (H,W,1) or (H,W,3); got {img.dtype} {img.shape}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    buf = io.BytesIO()
    Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def grid_image(
    images: np.ndarray,
    *,
    nrow: int | None = None,
    scale: int = 4,
    attribution: np.ndarray | None = None,
    source_names: Sequence[str] | None = None,
) -> Image.Image:
    """The grid of ``save_grid`` as a PIL image."""
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {imgs.dtype}")
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3) or len(imgs) == 0:
        raise DataError(f"images must be (N,H,W), (N,H,W,1) or (N,H,W,3) with N > 0, got shape {images.shape}")
    n, h, w, _ = imgs.shape
    att = None
    if attribution is not None:
        att = np.asarray(attribution, dtype=np.float64)
        if att.ndim != 2 or att.shape[0] != n:
            raise DataError(f"attribution must be (N={n}, K), got shape {att.shape}")
        if source_names is not None and len(source_names) != att.shape[1]:
            raise DataError(f"{len(source_names)} source names for {att.shape[1]} attribution columns")
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    cw, ch = w * scale, h * scale
    bar = max(3, scale * 2) if att is not None else 0
    pad = 2
    names = (
        list(source_names)
        if source_names is not None
        else ([f"source {i}" for i in range(att.shape[1])] if att is not None else [])
    )
    colours = [source_colour(name) for name in names]
    font = ImageFont.load_default()
    legend_h = (12 * math.ceil(len(names) / 4) + 6) if att is not None else 0
    width = cols * (cw + pad) + pad
    height = rows * (ch + bar + pad) + pad + legend_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (cw + pad), pad + r * (ch + bar + pad)
        tile = imgs[i][..., 0] if imgs.shape[-1] == 1 else imgs[i]
        im = Image.fromarray(tile, mode="L" if imgs.shape[-1] == 1 else "RGB").convert("RGB")
        canvas.paste(im.resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        if att is not None:
            # stacked bar: each source's share of the mean router weight over the trajectory
            row = att[i] / max(att[i].sum(), 1e-12)
            left = float(x)
            for k, share in enumerate(row):
                right = left + share * cw
                x0, x1 = round(left), round(right) - 1
                if x1 >= x0:
                    draw.rectangle([x0, y + ch, x1, y + ch + bar - 1], fill=colours[k])
                left = right
    if att is not None:
        y0 = rows * (ch + bar + pad) + pad + 2
        for k, name in enumerate(names):
            r, c = divmod(k, 4)
            x = pad + c * (width // 4)
            y = y0 + r * 12
            draw.rectangle([x, y + 2, x + 8, y + 10], fill=colours[k])
            draw.text((x + 11, y), name, fill=(0, 0, 0), font=font)
    return canvas
