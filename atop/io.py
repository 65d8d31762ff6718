"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The data go to a temporary file in the same folder (so `os.replace` is a rename on one file
system), are flushed to disk, then renamed over `path`; a failure removes the temporary file.
`atomic_folder` does the same for a folder of several files. What is published gets the mode a
plain `open()` or `mkdir` would give (the umask decides), not the private mode of a temporary.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, then rename it to `path`.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: writes the contents (e.g. `lambda f: torch.save(blob, f)`).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask),
        # so that a group sharing a study folder can read what the study writes
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary sibling folder, then publish it as `path` in one rename.

    Usage: `with atomic_folder(out) as tmp: (tmp / "a.json").write_text(...)`. If the block raises,
    the temporary folder is removed and `path` is untouched.

    Args:
        path: the folder to create; it must not exist, or be an empty folder (rename replaces
            only an empty one: anything else raises `OSError` and leaves it as it was).

    Yields:
        The temporary folder (private, 0700, while it is being filled).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        # mkdtemp makes the folder 0700; publish it as a plain mkdir would (0777 less the umask), so
        # that a group sharing the results can read them
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
