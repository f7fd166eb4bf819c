"""The atomic-write helper: permissions as open() gives them, the replaced file's mode kept, nothing left behind."""

from __future__ import annotations

import os
import re
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


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc: a folder no one can create files in")


def test_a_write_the_file_system_refuses_is_an_output_error_naming_the_path(tmp_path):
    """An existing folder as the target, a file in the way of the target's folder: an OutputError (an OSError, with the
    cause's errno, and a DataError: the command exits 2 with the message), nothing written, no temporary file left;
    the folder target is refused before the writer runs."""
    from evalgap import DataError
    from evalgap._files import OutputError

    calls = []
    (tmp_path / "adir.keras").mkdir()
    (tmp_path / "adir.keras" / "keep").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*adir\.keras: Is a directory") as done:
        atomic_write(tmp_path / "adir.keras", lambda tmp: calls.append(tmp), suffix=".keras")
    assert isinstance(done.value, DataError) and isinstance(done.value, OSError) and done.value.errno == 21
    assert calls == [] and [p.name for p in (tmp_path / "adir.keras").iterdir()] == ["keep"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*afile/r\.json") as done:
        atomic_write_text(tmp_path / "afile" / "r.json", "{}")
    assert done.value.errno is not None and (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.keras", "afile"]


@needs_proc
def test_a_folder_no_file_can_be_created_in_is_an_output_error(tmp_path):
    """/proc refuses new files, to root too (for whom permission bits do not count): what atomic_write meets after the
    work, check_writable finds before it."""
    from evalgap._files import OutputError, check_writable

    with pytest.raises(OutputError, match=r"cannot write /proc/r\.json"):
        atomic_write_text("/proc/r.json", "{}")
    with pytest.raises(OutputError, match=r"--json /proc/r\.json: no file can be created in /proc"):
        check_writable("/proc/r.json", "--json")
    with pytest.raises(OutputError, match=r"--out /proc/new/sub: no file can be created in /proc"):
        check_writable("/proc/new/sub", "--out", folder=True)


def test_check_writable_names_what_is_in_the_way_and_leaves_nothing(tmp_path):
    from evalgap._files import OutputError, check_writable

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"-o .*adir is a folder: give a file name"):
        check_writable(tmp_path / "adir", "-o")
    with pytest.raises(OutputError, match=r"--out .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile", "--out", folder=True)
    with pytest.raises(OutputError, match=r"--html .*afile/x/r\.html: .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "x" / "r.html", "--html")
    check_writable(tmp_path / "new" / "deeper" / "r.json", "--json")  # missing folders: atomic_write creates them
    check_writable(tmp_path / "afile", "-o")  # an existing file is replaced
    check_writable(tmp_path / "adir", "--out", folder=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile"]  # no probe left, no folder created


def test_check_writable_can_require_the_folder_of_a_file(tmp_path):
    """The command's reports and -o: a missing folder is refused (the one output check, exit 2), not made later."""
    from evalgap._files import OutputError, check_writable

    target = tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(OutputError, match=rf"^the folder of --json {re.escape(str(target))} does not exist: create "
                                          rf"{re.escape(str(target.parent))} first, or choose another path\.$"):
        check_writable(target, "--json", folder_exists=True)
    check_writable(tmp_path / "r.json", "--json", folder_exists=True)  # an existing folder
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"-o .*afile is a file, not a folder"):  # what is in the way is named first
        check_writable(tmp_path / "afile" / "x" / "f.keras", "-o", folder_exists=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile"]
