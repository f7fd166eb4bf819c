"""The atomic-write helper: permissions as open() gives them, the replaced file's mode kept, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from evalgap._files import atomic_write, atomic_write_text

posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """Set a umask for the test and put the previous one back."""
    saved = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _reference_mode(folder) -> int:
    """What a plain open(path, 'w') gives a new file under this umask."""
    ref = folder / "reference.txt"
    with open(ref, "w") as fh:
        fh.write("x")
    mode = _mode(ref)
    ref.unlink()
    return mode


@posix
@pytest.mark.parametrize("value", [0o022, 0o002, 0o077, 0o027], ids=oct)
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, umask, value):
    umask(value)
    atomic_write_text(tmp_path / "report.json", "{}")
    atomic_write(tmp_path / "model.keras", lambda tmp: open(tmp, "wb").write(b"zip"), suffix=".keras")
    expected = _reference_mode(tmp_path)
    assert expected == 0o666 & ~value
    assert _mode(tmp_path / "report.json") == expected and _mode(tmp_path / "model.keras") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "report.json"]  # no temporary file left


@posix
@pytest.mark.parametrize("existing", [0o644, 0o600, 0o640, 0o444], ids=oct)
def test_replacing_a_file_keeps_its_mode(tmp_path, umask, existing):
    umask(0o077)  # a new file would be 0600: the replaced file's mode wins
    target = tmp_path / "model.keras"
    target.write_bytes(b"old")
    os.chmod(target, existing)
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"), suffix=".keras")
    assert target.read_bytes() == b"new" and _mode(target) == existing


@posix
def test_a_writer_that_replaces_the_temporary_file_still_gives_the_mode(tmp_path, umask):
    umask(0o022)

    def write(tmp: str) -> None:  # as a library that writes its own file, then renames it over ours
        other = tmp + ".part"
        with open(other, "wb") as fh:
            fh.write(b"data")
        os.chmod(other, 0o600)
        os.replace(other, tmp)

    atomic_write(tmp_path / "a.npz", write, suffix=".npz")
    assert _mode(tmp_path / "a.npz") == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    atomic_write_text(tmp_path / "sub" / "new.txt", "hi")  # a missing folder is created
    assert (tmp_path / "sub" / "new.txt").read_text() == "hi"
