"""resize_with_pad against tf.image.resize_with_pad on the archive's odd-sized TIFFs."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from evalgap.data import resize_with_pad

TIF = Path(__file__).resolve().parents[3] / "shared" / "data" / "uc_merced" / "original_tif"
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="compares with TensorFlow")


@pytest.mark.skipif(not TIF.is_dir(), reason=f"original TIFFs not found at {TIF} (../shared/data/uc_merced)")
@pytest.mark.parametrize("name", ["buildings96", "harbor10", "sparseresidential45", "agricultural00"])
def test_real_tifs(name):
    import tensorflow as tf

    img = np.asarray(Image.open(TIF / f"{name}.tif").convert("RGB"))
    np.testing.assert_allclose(resize_with_pad(img, 256, 256), tf.image.resize_with_pad(img, 256, 256).numpy(), atol=1e-3)


@pytest.mark.parametrize("shape,target", [((100, 37, 3), (64, 48)), ((37, 100, 3), (64, 48)), ((300, 299, 3), (256, 256)), ((7, 9, 1), (20, 30))])
def test_random_shapes(shape, target):
    import tensorflow as tf

    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    # TensorFlow computes the sampling positions in float32, we in float64: < 0.01 grey level apart
    np.testing.assert_allclose(resize_with_pad(img, *target), tf.image.resize_with_pad(img, *target).numpy(), atol=1e-2)
