"""Robust photo decoding: odd modes convert without clipping, EXIF orientation applies, bombs are refused from the
header with bounded memory (the photos are built at test time from real CelebA images, never committed)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cushing.data.imageio import BadImage, open_rgb


def test_odd_modes_convert_without_clipping(bad_set):
    d, _ = bad_set
    gray = open_rgb(d / "gray.jpg")
    g16 = open_rgb(d / "gray16.png")
    assert g16.dtype == np.uint8 and g16.shape[2] == 3
    assert g16.max() < 255 or g16.mean() < 200, "16-bit values are scaled, not clipped to white"
    assert abs(float(g16.mean()) - float(gray.mean())) < 3
    rgba = open_rgb(d / "rgba.png")
    assert (rgba[:40] == 255).all(), "transparent pixels become white"
    cmyk = open_rgb(d / "cmyk.jpg")
    plain = np.asarray(Image.open(d / "plain.jpg").convert("RGB").resize((356, 436)))
    assert abs(float(cmyk.mean()) - float(plain.mean())) < 12
    rotated = open_rgb(d / "exif_rotated.jpg")
    assert rotated.shape[:2] == (436, 356), "EXIF orientation applied"


def test_bombs_are_refused_from_the_header(bad_set):
    d, _ = bad_set
    import time
    import tracemalloc

    tracemalloc.start()
    t = time.perf_counter()
    for name in ("bomb.png", "bomb_small_header.png"):
        with pytest.raises(BadImage) as e:
            open_rgb(d / name)
        assert e.value.reason == "decompression_bomb"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20 and time.perf_counter() - t < 5
