"""The one atomic writer and the one `.npz` reader that parameters, training
states, libraries and plots share (structc/files.py)."""
import os

import numpy as np
import pytest

from structc.files import read_archive, umask, write_atomically


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "p.npz"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError):
        write_atomically(str(path), fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["p.npz"]


def test_the_file_gets_the_mode_asked_for_else_a_plain_files(tmp_path):
    write_atomically(str(tmp_path / "a"), lambda f: f.write(b"x"))
    write_atomically(str(tmp_path / "b"), lambda f: f.write(b"x"), mode=0o750)
    write_atomically(str(tmp_path / "c"), lambda name: open(name, "w").write("x"), by_name=True)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask()
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "c").read_text() == "x"


def test_read_archive_gives_every_array_or_says_what_the_file_is(tmp_path):
    np.savez(tmp_path / "ok.npz", w=np.arange(3.0), b=np.ones(2, np.float32))
    arrays = read_archive(tmp_path / "ok.npz")
    assert sorted(arrays) == ["b", "w"] and arrays["w"].tolist() == [0.0, 1.0, 2.0]

    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "empty.npz").write_bytes(b"")
    whole = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    for name, says in [("one.npy", "bare array"), ("empty.npz", "not an .npz archive"),
                       ("cut.npz", "damaged (truncated or corrupt)")]:
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            read_archive(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_archive(tmp_path / "none.npz")


def test_an_archive_of_no_arrays_reads_back_empty(tmp_path):
    """A model without parameters saves an archive with no members (a zip that is its end
    record alone, `PK\\x05\\x06`); it reads back as no arrays, not as "not an .npz archive"."""
    np.savez(tmp_path / "none.npz")
    assert read_archive(tmp_path / "none.npz") == {}
