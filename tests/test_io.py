"""atop.io: atomic writes leave the whole new file or the old one, with the mode a plain open() gives."""
import os

import pytest

from atop.io import atomic_write_bytes, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a" / "f.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_bytes(tmp_path / "f.bin", b"old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    from atop.io import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_published_folder_follows_the_umask_and_holds_everything(tmp_path, umask):
    from atop.io import atomic_folder

    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            assert tmp.stat().st_mode & 0o777 == 0o700  # private while half-filled
            (tmp / "a.json").write_text("{}")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["a.json"]


def test_an_empty_folder_is_replaced(tmp_path):
    from atop.io import atomic_folder

    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.json").write_text("{}")
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "a.json").read_text() == "{}"


def test_a_failed_folder_leaves_nothing_and_a_full_target_is_kept(tmp_path):
    from atop.io import atomic_folder

    with pytest.raises(RuntimeError, match="boom"), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(OSError), atomic_folder(tmp_path / "full") as tmp:
        (tmp / "a.json").write_text("{}")
    assert os.listdir(tmp_path) == ["full"] and (tmp_path / "full" / "mine.txt").read_text() == "mine"
