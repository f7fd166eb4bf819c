"""``resize_with_pad`` with the semantics of ``tf.image.resize_with_pad`` (NumPy, no TensorFlow).

TensorFlow's rule, for an image of ``h x w`` and a target ``H x W``:

    ratio = max(w / W, h / H)
    h', w' = floor(h / ratio), floor(w / ratio)          # aspect kept
    top, left = floor((H - h / ratio) / 2), floor((W - w / ratio) / 2)   # centered zero padding

then a bilinear resize to ``h' x w'`` (half-pixel centers, no antialiasing, as
``tf.image.resize(..., "bilinear")``) and zero padding to ``H x W``. The result is float32.
"""

from __future__ import annotations

import math

import numpy as np


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weights of hi for one axis, half-pixel centers."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, None)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``(h, w, c)`` image with half-pixel centers; float32."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img.copy()
    lo, hi, wy = _bilinear_axis(h, height)
    rows = img[lo] * (1 - wy)[:, None, None] + img[hi] * wy[:, None, None]
    lo, hi, wx = _bilinear_axis(w, width)
    return rows[:, lo] * (1 - wx)[None, :, None] + rows[:, hi] * wx[None, :, None]


def resize_with_pad(image: np.ndarray, target_height: int, target_width: int) -> np.ndarray:
    """Resize keeping the aspect ratio, then pad with zeros to ``target_height x target_width``."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    h, w = img.shape[:2]
    ratio = max(w / target_width, h / target_height)
    new_h, new_w = max(1, int(math.floor(h / ratio))), max(1, int(math.floor(w / ratio)))
    top = max(0, int(math.floor((target_height - h / ratio) / 2)))
    left = max(0, int(math.floor((target_width - w / ratio) / 2)))
    resized = resize_bilinear(img, new_h, new_w)
    out = np.zeros((target_height, target_width, img.shape[2]), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = resized
    return out
