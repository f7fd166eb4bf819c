"""Data sources: image folders and zips (UC Merced layout), tfds, arrays, the embedded demo data."""

from __future__ import annotations

from .digits import load_digits_rgb
from .folder import ImageSet, load_image_folder, load_npz
from .resize import resize_with_pad
from .tfds_source import load_tfds

__all__ = ["load_digits_rgb", "load_image_folder", "load_npz", "load_tfds", "resize_with_pad", "ImageSet"]
