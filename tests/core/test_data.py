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


def test_a_corrupt_truncated_or_pickled_npz_is_a_data_error_saying_how_to_write_one(tmp_path):
    """Not a zip, truncated, empty, an object (pickled) array, a bare .npy, a damaged compressed member: each a
    DataError naming the file and np.savez, never NumPy's advice to load it with allow_pickle."""
    np.savez_compressed(tmp_path / "good.npz", x=np.random.default_rng(0).normal(size=(64, 8, 8, 3)), y=np.arange(64))
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "not_zip.npz").write_bytes(b"not a zip")
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    damaged = bytearray(raw)
    damaged[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)  # inside x's compressed bytes; the directory intact
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    np.savez(tmp_path / "objects.npz", x=np.zeros((3, 2)), y=np.array([1, "a", None], dtype=object))
    np.save(tmp_path / "bare.npy", np.zeros((3, 2)))
    (tmp_path / "bare.npy").rename(tmp_path / "bare.npz")
    for bad, why in [("not_zip", "not a zip"), ("truncated", "not a zip"), ("empty", "unreadable"), ("damaged", "damaged"),
                     ("objects", "Python objects"), ("bare", "single .npy array")]:
        with pytest.raises(DataError) as info:
            load_npz(tmp_path / f"{bad}.npz")
        msg = str(info.value)
        assert f"{bad}.npz is not a valid .npz of numeric arrays" in msg and why in msg, msg
        assert "np.savez(path, x=images, y=labels)" in msg and "allow_pickle" not in msg and "pickle.load" not in msg, msg
    np.savez(tmp_path / "scalars.npz", x=np.float32(1), y=np.int64(1))
    with pytest.raises(DataError, match=r"one row per sample, got shapes \(\) and \(\).*np\.savez"):
        load_npz(tmp_path / "scalars.npz")
    assert load_npz(tmp_path / "good.npz")[0].shape == (64, 8, 8, 3)


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


# ---- 16-bit images, the zip rule, bad zips, tfds's manual archive and channels ------------------------------------


def test_16_bit_and_wider_images_keep_their_top_8_bits_as_tensorflow_reads_a_16_bit_png(tmp_path):
    """Pillow's convert("RGB") clips 16-bit samples at 255 (a white image). TensorFlow reads a 16-bit PNG with
    decode_png(channels=3) as value >> 8 in each channel: the loader matches it for PNG and TIFF, scales a 32-bit
    TIFF by its bit depth and a [0, 1] float TIFF to [0, 255], and counts each as converted."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    v16 = rng.integers(0, 65536, (12, 12), dtype=np.uint16)
    v16[0, :4] = [0, 255, 256, 65535]  # where value >> 8 and rounding value / 257 differ (255 -> 0, not 1)
    v32 = rng.integers(0, 2**31 - 1, (12, 12), dtype=np.int64).astype(np.int32)
    vf = rng.random((12, 12)).astype(np.float32)
    images = tmp_path / "Images"
    for cls in ("a_png16", "b_tif16", "c_tif16b", "d_tif32", "e_float"):
        (images / cls).mkdir(parents=True)
    Image.fromarray(v16).save(images / "a_png16" / "x.png")
    Image.fromarray(v16).save(images / "b_tif16" / "x.tif")
    Image.frombytes("I;16B", (12, 12), v16.astype(">u2").tobytes()).save(images / "c_tif16b" / "x.tif")
    Image.fromarray(v32).save(images / "d_tif32" / "x.tif")
    Image.fromarray(vf).save(images / "e_float" / "x.tif")
    assert [Image.open(p).mode for p in sorted(images.rglob("x.*"))] == ["I;16", "I;16", "I;16B", "I", "F"]
    s = load_image_folder(tmp_path, 12, cache=False)  # 12x12 into 12x12: resize_with_pad copies the pixels
    assert s.class_names == ["a_png16", "b_tif16", "c_tif16b", "d_tif32", "e_float"] and s.converted == 5
    by_tf = tf.io.decode_png((images / "a_png16" / "x.png").read_bytes(), channels=3).numpy()
    np.testing.assert_array_equal(s.images[0], by_tf)
    top8 = np.repeat((v16 >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(by_tf, top8)
    for i in (1, 2):
        np.testing.assert_array_equal(s.images[i], top8)
    np.testing.assert_array_equal(s.images[3], np.repeat((v32 >> 23).astype(np.uint8)[..., None], 3, axis=-1))  # signed 32-bit: 31 bits
    np.testing.assert_array_equal(s.images[4], np.repeat(np.rint(vf.astype(np.float64) * 255).astype(np.uint8)[..., None], 3, axis=-1))
    # a float image that is neither [0, 1] nor [0, 255] has no bit depth to read it by: named, or left out
    Image.fromarray((vf * 1000).astype(np.float32)).save(images / "e_float" / "y.tif")
    with pytest.raises(DataError, match=r"y\.tif.*floating-point image with values in \[.*neither \[0, 1\] nor \[0, 255\]"):
        load_image_folder(tmp_path, 12, cache=False)
    assert load_image_folder(tmp_path, 12, cache=False, skip_bad=True).skipped == [str(images / "e_float" / "y.tif")]


def _write_tree(root: Path, files: dict[str, np.ndarray]) -> None:
    for rel, a in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / rel)


def _zip_tree(root: Path, zpath: Path, sep: str = "/") -> None:
    """Zip every file and folder below ``root`` as ``zip -r`` stores them (folders as their own entries)."""
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*")):
            name = sep.join(p.relative_to(root).parts)
            if p.is_dir():
                zf.writestr(name + sep, b"")
            else:
                zf.write(p, name)


def test_a_zip_gives_the_classes_and_labels_of_the_same_folder_unzipped(tmp_path, caplog):
    """The class is the folder just below the class root (Images), in a zip as in a folder: an image above the class
    folders, one beside them and one in a sub-folder of a class are not read (with a warning), not classes of their own."""
    rng = np.random.default_rng(5)
    px = {n: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in ("a0", "a1", "b0", "c0", "c1", "pre", "str", "sub")}
    unzipped = tmp_path / "unzipped"
    _write_tree(unzipped, {
        "UCMerced_LandUse/preview.png": px["pre"],
        "UCMerced_LandUse/Images/stray.png": px["str"],
        "UCMerced_LandUse/Images/a/a0.png": px["a0"], "UCMerced_LandUse/Images/a/a1.png": px["a1"],
        "UCMerced_LandUse/Images/b/b0.png": px["b0"],
        "UCMerced_LandUse/Images/c/c0.png": px["c0"], "UCMerced_LandUse/Images/c/c1.png": px["c1"],
        "UCMerced_LandUse/Images/c/sub/s0.png": px["sub"],
    })
    zpath = tmp_path / "UCMerced_LandUse.zip"
    _zip_tree(unzipped, zpath)
    expected = np.stack([px[n] for n in ("a0", "a1", "b0", "c0", "c1")])
    for src in (unzipped, unzipped / "UCMerced_LandUse", zpath):
        s = load_image_folder(src, 8, cache=False)
        assert s.class_names == ["a", "b", "c"] and s.labels.tolist() == [0, 0, 1, 2, 2], (src, s.class_names, s.labels)
        np.testing.assert_array_equal(s.images, expected)
    for src in (unzipped, zpath):  # what is not read is said
        caplog.clear()
        with caplog.at_level("WARNING", logger="evalgap.data"):
            load_image_folder(src, 8, cache=False)
        assert "c/sub" in caplog.text and "stray.png" in caplog.text, caplog.text
    # a zip of the class folders themselves (Images/ at the top, a sub-folder in a class): the same classes
    _zip_tree(unzipped / "UCMerced_LandUse", tmp_path / "images_only.zip")
    assert load_image_folder(tmp_path / "images_only.zip", 8, cache=False).labels.tolist() == [0, 0, 1, 2, 2]
    # a class folder without an image is an error in a zip as in the folder, not a class silently dropped
    (unzipped / "UCMerced_LandUse" / "Images" / "d").mkdir()
    _zip_tree(unzipped, tmp_path / "empty_class.zip")
    for src in (unzipped, tmp_path / "empty_class.zip"):
        with pytest.raises(DataError, match=r"class folder .*Images/d(/ in .*empty_class\.zip)? holds no image"):
            load_image_folder(src, 8, cache=False)


def test_a_zip_of_one_folder_of_class_folders_and_a_windows_zip_are_read(tmp_path):
    """zip -r flowers.zip flowers/ stores flowers/<class>/...: the classes are below flowers, as --data flowers gives
    them; a zip whose names use backslashes (some Windows tools) is read by the same rule."""
    rng = np.random.default_rng(6)
    px = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    _write_tree(tmp_path / "src", {"flowers/daisy/0.png": px[0], "flowers/daisy/1.png": px[1], "flowers/rose/0.png": px[2]})
    _zip_tree(tmp_path / "src", tmp_path / "flowers.zip")
    _zip_tree(tmp_path / "src", tmp_path / "windows.zip", sep="\\")
    assert "flowers\\daisy\\0.png" in zipfile.ZipFile(tmp_path / "windows.zip").namelist()
    for src in (tmp_path / "src" / "flowers", tmp_path / "flowers.zip", tmp_path / "windows.zip"):
        s = load_image_folder(src, 8, cache=False)
        assert s.class_names == ["daisy", "rose"] and s.labels.tolist() == [0, 0, 1], src
        np.testing.assert_array_equal(s.images, np.stack(px))


def test_a_truncated_or_fake_zip_is_a_data_error_and_a_folder_named_zip_is_a_folder(tmp_path):
    rng = np.random.default_rng(7)
    _write_tree(tmp_path / "src", {"Images/a/0.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                                   "Images/b/0.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)})
    _zip_tree(tmp_path / "src", tmp_path / "good.zip")
    raw = (tmp_path / "good.zip").read_bytes()
    (tmp_path / "truncated.zip").write_bytes(raw[: len(raw) // 2])  # an interrupted download
    (tmp_path / "fake.zip").write_text("<html>404</html>")
    for bad in ("truncated.zip", "fake.zip"):
        with pytest.raises(DataError, match=rf"{bad} is not a valid zip file \(a truncated download\?\)"):
            load_image_folder(tmp_path / bad, 8, cache=False)
    shutil.copytree(tmp_path / "src", tmp_path / "photos.zip")  # a folder that happens to end in .zip
    assert load_image_folder(tmp_path / "photos.zip", 8, cache=False).class_names == ["a", "b"]


def _archive(path: Path, classes: tuple[str, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for c in classes:
            buf = path.parent / "tmp.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf)
            zf.write(buf, f"UCMerced_LandUse/Images/{c}/{c}00.png")
            buf.unlink()


def test_tfds_manual_dir_reads_the_data_set_s_own_archive(tmp_path, monkeypatch):
    """uc_merced's manual archive is UCMerced_LandUse.zip: not whichever zip sorts first; another data set, a folder
    without that archive and a missing folder are each said, never a download (the network is off here)."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_source, "reachable", lambda *a, **k: False)
    manual = tmp_path / "manual"
    manual.mkdir()
    _archive(manual / "A_backup.zip", ("p", "q", "r"), 0)  # sorts first
    _archive(manual / "UCMerced_LandUse.zip", ("w", "x"), 1)
    for name in ("uc_merced", "uc_merced:2.0.0"):
        s = load_tfds(name, manual_dir=manual, image_size=8)
        assert s.class_names == ["w", "x"] and len(s) == 2
    with pytest.raises(DataError, match=r"--tfds-manual-dir is read only for uc_merced \(UCMerced_LandUse.zip\), not for 'mnist'"):
        load_tfds("mnist", manual_dir=manual, image_size=8)
    (manual / "UCMerced_LandUse.zip").unlink()
    with pytest.raises(DataError, match=r"holds no UCMerced_LandUse.zip \(it holds A_backup.zip\)"):
        load_tfds("uc_merced", manual_dir=manual, image_size=8)
    with pytest.raises(DataError, match=r"--tfds-manual-dir .*missing does not exist: give the folder that holds UCMerced_LandUse.zip"):
        load_tfds("uc_merced", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "missing", image_size=8)


def _fake_tfds(monkeypatch, images: np.ndarray, names=("a", "b")):
    """tfds.builder answering with a prepared data set of these images (labels alternating), as tf.data gives them."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    labels = np.arange(len(images)) % len(names)

    class Builder:
        data_dir = "prepared"
        info = type("Info", (), {"features": {"label": type("Label", (), {"names": list(names)})()}})()

        def is_prepared(self):
            return True

        def as_dataset(self, split):
            return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    return labels


def test_tfds_grayscale_rgba_and_16_bit_images_come_as_rgb(monkeypatch):
    """A 1-channel (MNIST-like) or 4-channel tfds data set gave the model 1 or 4 channels; they come as RGB, converted
    as Pillow converts such files (gray repeated, alpha dropped), a 16-bit one as decode_png(channels=3) reads it;
    each counted."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(8)
    gray = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (4, 8, 8, 4), dtype=np.uint8)
    wide = rng.integers(0, 65536, (4, 8, 8, 1), dtype=np.uint16)
    for images, reference in (
        (gray, [np.asarray(Image.fromarray(g[..., 0], "L").convert("RGB")) for g in gray]),
        (rgba, [np.asarray(Image.fromarray(a, "RGBA").convert("RGB")) for a in rgba]),
        (wide, [tf.io.decode_png(tf.io.encode_png(w), channels=3).numpy() for w in wide]),
    ):
        labels = _fake_tfds(monkeypatch, images)
        s = load_tfds("fake", image_size=8)
        assert s.images.shape == (4, 8, 8, 3) and s.converted == 4 and s.labels.tolist() == labels.tolist()
        np.testing.assert_array_equal(s.images, np.stack(reference))
    _fake_tfds(monkeypatch, rgba[..., :3].copy())
    assert load_tfds("fake", image_size=8).converted == 0


def test_a_train_val_folder_or_a_folder_a_level_too_high_names_the_folders_of_class_folders_below(tmp_path):
    """data/train/<class>/..., data/val/<class>/... (or a folder two levels above the classes) was "class folder
    data/train holds no image: remove it or add its images": it says the sub-folders hold folders, not images, and
    names the folders below that hold class folders, as --data; in a zip too. A class folder among classes that holds
    a folder, and an empty class folder, keep their own messages."""
    rng = np.random.default_rng(9)
    px = lambda: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # noqa: E731
    _write_tree(tmp_path / "src", {f"two/{split}/{c}/{i}.png": px() for split in ("train", "val") for c in ("a", "b") for i in (0, 1)})
    two = tmp_path / "src" / "two"
    with pytest.raises(DataError) as err:
        load_image_folder(two, 8, cache=False)
    said = str(err.value)
    assert f"{two}: its sub-folders (train, val) hold folders, not images, so they are not class folders" in said, said
    assert f"--data {two / 'train'} (found 2: {two / 'train'}, {two / 'val'})" in said and "remove it" not in said, said
    assert load_image_folder(two / "train", 8, cache=False).class_names == ["a", "b"]  # what it suggests reads
    _zip_tree(tmp_path / "src", tmp_path / "two.zip")  # zip -r two.zip two/: the top folder is looked into, as unzipped
    with pytest.raises(DataError, match=r"two/ in .*two\.zip: its sub-folders \(train, val\) hold folders, not images.* "
                                        r"in two/train/, two/val/ of the zip: unzip it .*--data <unzipped>/two/train"):
        load_image_folder(tmp_path / "two.zip", 8, cache=False)
    # two levels too high, beside folders of other files: the folder of class folders is found below
    (tmp_path / "src" / "notes").mkdir()
    (tmp_path / "src" / "notes" / "readme.md").write_text("x")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "src", 8, cache=False)
    said = str(err.value)
    assert "none of its sub-folders (notes, two) holds an image" in said and "(two holds folders)" in said, said
    assert f"--data {two / 'train'}" in said, said
    # nothing below to suggest
    (tmp_path / "deep" / "x" / "y" / "z").mkdir(parents=True)
    with pytest.raises(DataError, match=r"hold folders, not images.*no folder up to 4 levels below it holds class folders"):
        load_image_folder(tmp_path / "deep", 8, cache=False)
    # a class among classes that holds a folder of images, and an empty class folder with a text file: their own words
    _write_tree(tmp_path / "mixed", {"a/0.png": px(), "b/inner/0.png": px()})
    with pytest.raises(DataError, match=r"class folder .*mixed/b holds folders \(inner\), not images .*move them there"):
        load_image_folder(tmp_path / "mixed", 8, cache=False)
    _write_tree(tmp_path / "empty", {"a/0.png": px()})
    (tmp_path / "empty" / "b").mkdir()
    (tmp_path / "empty" / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*empty/b holds no image \(.*\); it holds readme.txt: remove it or add its images"):
        load_image_folder(tmp_path / "empty", 8, cache=False)


def test_bmp_gif_and_webp_images_are_read_and_other_files_are_counted_in_a_warning(tmp_path, caplog):
    """keras.utils.image_dataset_from_directory reads .bmp and .gif (its first frame): they were dropped without a
    word, so the counts were wrong. They are read (.webp too, where Pillow reads it), in a folder and its zip; other
    files in a class folder are left out with a warning naming a few and the count."""
    from PIL import features

    rng = np.random.default_rng(10)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)  # a GIF keeps these exactly
    px = {n: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for n in ("png", "bmp", "webp")}
    px["gif"] = palette[rng.integers(0, 4, (8, 8))]
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(px["png"]).save(root / "a" / "0.png")
    Image.fromarray(px["bmp"]).save(root / "a" / "1.bmp")
    frames = [Image.fromarray(px["gif"]), Image.fromarray(palette[rng.integers(0, 4, (8, 8))])]
    frames[0].save(root / "b" / "2.gif", save_all=True, append_images=frames[1:], duration=100)  # animated: the first frame
    webp = features.check("webp")
    if webp:
        Image.fromarray(px["webp"]).save(root / "b" / "3.webp", lossless=True)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "photo.heic").write_bytes(b"\0" * 16)
    _zip_tree(root, tmp_path / "imgs.zip")
    for src in (root, tmp_path / "imgs.zip"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="evalgap.data"):
            s = load_image_folder(src, 8, cache=False)
        names = ["png", "bmp", "gif"] + (["webp"] if webp else [])
        assert len(s) == len(names) and s.labels.tolist() == [0, 0, 1] + ([1] if webp else []), (src, s.labels)
        np.testing.assert_array_equal(s.images, np.stack([px[n] for n in names]))
        assert "2 file(s) in the class folders are left out" in caplog.text and "a/notes.txt, b/photo.heic" in caplog.text, caplog.text


def test_an_unknown_tfds_name_is_one_short_line_with_close_names(monkeypatch):
    """tfds's DatasetNotFoundError pastes every data set's name (460 lines): one line, the name, close matches and how
    to list them; a config the data set lacks is one line too. (tfds looks the names up offline.)"""
    pytest.importorskip("tensorflow_datasets")
    for name, close in (("nosuchds", None), ("uc_merce", "uc_merced")):
        with pytest.raises(DataError) as err:
            load_tfds(name, image_size=8)
        said = str(err.value)
        assert len(said.splitlines()) == 1 and len(said) < 400 and f"tfds has no data set named {name!r}" in said, said
        assert "tfds.list_builders()" in said and ("Close names: uc_merced" in said if close else "Close names" not in said), said
    with pytest.raises(DataError) as err:
        load_tfds("mnist/no_such_config", image_size=8)
    assert len(str(err.value).splitlines()) == 1 and "no_such_config" in str(err.value), str(err.value)
