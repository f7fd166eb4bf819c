"""Data sources: the embedded demo data (and, later, image folders, tfds and arrays)."""

from __future__ import annotations

from .digits import load_digits_rgb

__all__ = ["load_digits_rgb"]
