"""The embedded demo data: scikit-learn's handwritten digits as raw-pixel RGB images.

1797 images of 8x8 pixels with values 0..16, 10 classes. Made to look like the seed's
input: values scaled to 0..255 (``round(v * 255 / 16)``, kept raw, not normalized),
upscaled to ``size x size`` by pixel repetition, three identical channels, uint8, NHWC.
"""

from __future__ import annotations

import numpy as np

from ..errors import EvalgapError


def load_digits_rgb(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (1797, size, size, 3), labels int64 (1797,))``."""
    if size % 8 != 0 or size <= 0:
        raise EvalgapError(f"size must be a positive multiple of 8 (the digits are 8x8), got {size}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EvalgapError("the demo data come from scikit-learn: pip install 'evalgap[demo]'.") from exc
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    k = size // 8
    images = images.repeat(k, axis=1).repeat(k, axis=2)
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)
