"""Data loaders: image folders and zips in the UC Merced layout, the cache, npz, tfds offline."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evalgap import DataError
from evalgap.data import load_image_folder, load_npz, load_tfds, resize_with_pad
from evalgap.data import tfds_source

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "uc_merced"
IMAGES = SHARED / "UCMerced_LandUse" / "Images"
needs_data = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"UC Merced images not found at {IMAGES} (../shared/data/uc_merced)")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALGAP_CACHE", str(tmp_path / "cache"))


def _folder(tmp_path: Path, spec: dict[str, list[np.ndarray]], ext=".png") -> Path:
    root = tmp_path / "Images"
    for cls, arrays in spec.items():
        (root / cls).mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(root / cls / f"{cls}{i:02d}{ext}")
    return tmp_path


def test_resize_with_pad_by_hand():
    img = np.arange(256 * 242 * 3, dtype=np.float64).reshape(256, 242, 3) % 251
    out = resize_with_pad(img, 256, 256)  # ratio 1: no resampling, 7 columns of zeros each side
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 7:249], img.astype(np.float32))
    assert not out[:, :7].any() and not out[:, 249:].any()
    # 2x downscale with half-pixel centers averages pixel pairs
    small = resize_with_pad(np.array([[0.0, 2.0, 4.0, 6.0]] * 4)[..., None], 2, 2)
    np.testing.assert_allclose(small[..., 0], [[1.0, 5.0], [1.0, 5.0]])


@needs_data
def test_real_uc_merced_folder():
    s = load_image_folder(SHARED / "UCMerced_LandUse", 256, cache=False)
    assert len(s) == 2100 and s.images.shape == (2100, 256, 256, 3) and s.images.dtype == np.uint8
    assert s.class_names[:3] == ["agricultural", "airplane", "baseballdiamond"] and len(s.class_names) == 21
    assert s.class_names == sorted(s.class_names)  # tfds order
    assert np.bincount(s.labels).tolist() == [100] * 21


@needs_data
def test_original_tifs_of_other_sizes_are_padded(tmp_path):
    # the archive's TIFFs as they come, in the official layout: 247x247, 257x257, 242x256 among them
    for name in ("buildings96", "harbor10", "sparseresidential45", "agricultural00"):
        cls = name.rstrip("0123456789")
        (tmp_path / "Images" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / "original_tif" / f"{name}.tif", tmp_path / "Images" / cls / f"{name}.tif")
    s = load_image_folder(tmp_path, 256)
    assert s.images.shape == (4, 256, 256, 3) and s.class_names == ["agricultural", "buildings", "harbor", "sparseresidential"]
    sparse = s.images[3]
    assert not sparse[:, :7].any() and not sparse[:, 249:].any() and sparse[:, 7:249].any()  # 242 wide: 7 + 7 padding


def test_zip_grayscale_rgba_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (20, 16, 3), dtype=np.uint8) for _ in range(2)]
    gray = [rng.integers(0, 256, (16, 16), dtype=np.uint8)]
    rgba = [rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)]
    root = _folder(tmp_path / "src", {"b_class": rgb, "a_class": gray + rgba})
    s = load_image_folder(root, 16)
    assert s.class_names == ["a_class", "b_class"] and s.labels.tolist() == [0, 0, 1, 1]
    assert s.converted == 2 and s.images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(s.images[0, :, :, 0], gray[0])
    again = load_image_folder(root, 16)
    assert again.from_cache and np.array_equal(again.images, s.images)
    # a changed file invalidates the cache
    f = root / "Images" / "b_class" / "b_class00.png"
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(f)
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert not load_image_folder(root, 16).from_cache
    # the same tree as a zip, read in place
    zpath = tmp_path / "UCMerced_LandUse.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((root / "Images").rglob("*.png")):
            zf.write(p, f"UCMerced_LandUse/Images/{p.parent.name}/{p.name}")
    z = load_image_folder(zpath, 16)
    assert z.class_names == ["a_class", "b_class"] and np.array_equal(z.images, load_image_folder(root, 16).images)


def test_bad_files_are_named_or_skipped(tmp_path):
    rng = np.random.default_rng(0)
    root = _folder(tmp_path, {"a": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)] * 2})
    bad = root / "Images" / "a" / "a99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="a99.png"):
        load_image_folder(root, 8)
    s = load_image_folder(root, 8, skip_bad=True)
    assert len(s) == 2 and s.skipped == [str(bad)]
    (root / "Images" / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        load_image_folder(root, 8)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # a macOS ._ file: not an image


def test_hidden_entries_and_macosx_are_skipped_in_folders_and_zips(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"cat": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)],
              "dog": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]}
    root = _folder(tmp_path / "src", arrays)
    images = root / "Images"
    (images / ".ipynb_checkpoints").mkdir()  # Jupyter's: an image inside must not make it a class
    Image.fromarray(arrays["cat"][0]).save(images / ".ipynb_checkpoints" / "cat00-checkpoint.png")
    (images / "cat" / "._cat00.png").write_bytes(APPLE_DOUBLE)
    (images / "dog" / ".hidden.png").write_bytes(APPLE_DOUBLE)
    (images / "__MACOSX" / "cat").mkdir(parents=True)
    (images / "__MACOSX" / "cat" / "._cat01.png").write_bytes(APPLE_DOUBLE)
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    expected = np.stack(arrays["cat"] + arrays["dog"])  # 8x8 into 8x8: resize_with_pad copies the pixels
    s = load_image_folder(root, 8, cache=False)
    assert s.class_names == ["cat", "dog"] and s.labels.tolist() == [0, 0, 1] and not s.skipped
    np.testing.assert_array_equal(s.images, expected)
    # the same tree zipped on a Mac: __MACOSX/ beside it, ._ files and hidden folders inside it
    zpath = tmp_path / "UCMerced_LandUse.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(images.rglob("*")):
            if p.is_file():
                zf.write(p, f"UCMerced_LandUse/Images/{p.relative_to(images).as_posix()}")
        zf.writestr("__MACOSX/UCMerced_LandUse/Images/dog/._dog00.png", APPLE_DOUBLE)
        zf.writestr("UCMerced_LandUse/.git/objects/aa.png", APPLE_DOUBLE)
    names = zipfile.ZipFile(zpath).namelist()
    assert "UCMerced_LandUse/Images/cat/._cat00.png" in names and "UCMerced_LandUse/Images/__MACOSX/cat/._cat01.png" in names
    z = load_image_folder(zpath, 8, cache=False)
    assert z.class_names == ["cat", "dog"] and z.labels.tolist() == [0, 0, 1] and not z.skipped
    np.testing.assert_array_equal(z.images, expected)
    # a class folder holding only hidden files is still named as empty
    (images / "eel").mkdir()
    (images / "eel" / "._eel00.png").write_bytes(APPLE_DOUBLE)
    with pytest.raises(DataError, match="eel holds no image"):
        load_image_folder(root, 8, cache=False)


def test_a_zip_gives_the_folder_s_images_in_the_folder_s_order(tmp_path):
    """zip -r stores entries in directory order, not sorted: the loader sorts them as it lists a folder, so a
    zip and its folder (and --limit-per-class of each) give the same arrays."""
    rng = np.random.default_rng(1)
    arrays = {c: [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)] for c in ("b", "a")}
    root = _folder(tmp_path / "src", arrays)
    zpath = tmp_path / "UCMerced_LandUse.zip"
    with zipfile.ZipFile(zpath, "w") as zf:  # stored in a scrambled order
        for p in sorted((root / "Images").rglob("*.png"), key=lambda p: (p.name[-6:], p.parent.name), reverse=True):
            zf.write(p, f"UCMerced_LandUse/Images/{p.parent.name}/{p.name}")
    for limit in (None, 2):
        folder, zipped = (load_image_folder(src, 8, cache=False, limit_per_class=limit) for src in (root, zpath))
        expected = np.stack([a for c in ("a", "b") for a in arrays[c][:limit]])
        np.testing.assert_array_equal(folder.images, expected)
        np.testing.assert_array_equal(zipped.images, expected)
        assert folder.labels.tolist() == zipped.labels.tolist()


def test_skip_bad_is_part_of_the_cache_key_and_a_dangling_link_is_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    root = _folder(tmp_path, {"a": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)] * 2})
    (root / "Images" / "a" / "a98.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert len(load_image_folder(root, 8, skip_bad=True)) == 2  # cached without the bad file
    with pytest.raises(DataError, match="a98.png"):  # a run without skip_bad is not served that cache
        load_image_folder(root, 8)
    (root / "Images" / "a" / "a98.png").unlink()
    os.symlink(tmp_path / "not-fetched.png", root / "Images" / "a" / "a99.png")  # DVC / git-annex data not fetched
    with pytest.raises(DataError, match="a99.png.*No such file"):
        load_image_folder(root, 8)
    s = load_image_folder(root, 8, skip_bad=True)
    assert len(s) == 2 and s.skipped == [str(root / "Images" / "a" / "a99.png")]


def test_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.arange(3))
    x, y = load_npz(tmp_path / "d.npz")
    assert x.shape == (3, 2) and y.tolist() == [0, 1, 2]
    np.savez(tmp_path / "bad.npz", a=np.zeros(2))
    with pytest.raises(DataError, match="expected arrays named x and y"):
        load_npz(tmp_path / "bad.npz")


def test_tfds_offline_fails_fast_and_manual_zip_is_read(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "reachable", lambda *a, **k: False)
    t = time.perf_counter()
    with pytest.raises(DataError, match="--data"):
        load_tfds("uc_merced", data_dir=tmp_path / "tfds")
    assert time.perf_counter() - t < 30
    rng = np.random.default_rng(0)
    root = _folder(tmp_path / "src", {"x": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)], "w": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]})
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "UCMerced_LandUse.zip", "w") as zf:
        for p in (root / "Images").rglob("*.png"):
            zf.write(p, f"UCMerced_LandUse/Images/{p.parent.name}/{p.name}")
    s = load_tfds("uc_merced", manual_dir=manual, image_size=8)
    assert s.class_names == ["w", "x"] and len(s) == 2
    with zipfile.ZipFile(manual / "UCMerced_LandUse.zip", "a") as zf:  # a damaged image in the archive
        zf.writestr("UCMerced_LandUse/Images/x/x99.png", b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="x99.png in .*UCMerced_LandUse.zip"):
        load_tfds("uc_merced", manual_dir=manual, image_size=8)
    s = load_tfds("uc_merced", manual_dir=manual, image_size=8, skip_bad=True)
    assert len(s) == 2 and s.skipped == ["UCMerced_LandUse/Images/x/x99.png"]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300), cut=st.integers(0, 400), ext=st.sampled_from([".png", ".jpg", ".tif"]))
def test_corrupt_bytes_give_a_named_error_or_are_skipped(tmp_path_factory, blob, cut, ext):
    root = tmp_path_factory.mktemp("fuzz")
    good = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    _folder(root, {"a": [good]})
    # a real image cut short, or random bytes, under an image name
    buf = root / "real.png"
    Image.fromarray(good).save(buf)
    data = buf.read_bytes()[:cut] + blob if cut % 2 else blob
    bad = root / "Images" / "a" / f"zz{ext}"
    bad.write_bytes(data)
    try:
        s = load_image_folder(root, 8, cache=False)
        assert len(s) == 2  # the bytes happened to decode: then it is a proper image
    except DataError as exc:
        assert "zz" in str(exc)
        s = load_image_folder(root, 8, cache=False, skip_bad=True)
        assert len(s) == 1 and s.skipped == [str(bad)]


def test_tfds_checksum_mismatch_is_explained(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    class NonMatchingChecksumError(Exception):
        pass

    class FakeBuilder:
        data_dir = str(tmp_path)

        def is_prepared(self):
            return False

        def download_and_prepare(self):
            raise NonMatchingChecksumError("UCMerced_LandUse.zip: sha256 differs")

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder())
    monkeypatch.setattr(tfds_source, "reachable", lambda *a, **k: True)
    with pytest.raises(DataError, match="checksum.*--tfds-manual-dir"):
        load_tfds("uc_merced")
