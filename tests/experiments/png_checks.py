"""Shared check that a PNG file is a real, non-blank image of the expected size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Pixel size of the curve and sweep plots (8 x 5 inches at 100 dpi, see experiments/plots.py).
CURVE_PLOT_SIZE = (800, 500)
# Upper bound on a plot's file size so that the docs stay small.
MAX_PNG_BYTES = 200_000


def assert_png(path: Path, size: tuple[int, int] | None = CURVE_PLOT_SIZE) -> np.ndarray:
    """Open ``path`` with Pillow; assert PNG format, ``size`` (width, height), not blank, < 200 KB."""
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    assert 1000 < path.stat().st_size < MAX_PNG_BYTES, f"{path} has {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size, f"{path} is {image.size}, expected {size}"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0, f"{path} is blank"
    # More than the white background: lines/markers in several colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{path} has almost no content"
    return pixels
