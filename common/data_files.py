"""Which entries of a data folder may be read: regular files inside it, with UTF-8 names, opened without blocking."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

# Images larger than this (width x height, read from the header before decoding) are refused; a site
# may set another limit. 50 MP is ten times a large whole-slide tile and far above any smear image.
MAX_IMAGE_PIXELS = 50_000_000


def entry_problem(path: Path, root: Path) -> str | None:
    """Why `path` (a file or folder found under `root`) must be skipped, or None when it may be read."""
    if not is_utf8(str(path.relative_to(root))):
        return "name is not valid UTF-8"
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = Path(os.path.realpath(path))
            if not target.is_relative_to(root):
                return "symlink leading out of the data folder"
            info = target.stat()
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
        return None
    return "not a regular file (FIFO, device or socket)"


def is_utf8(name: str) -> bool:
    """False for names holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A printable form of a file name: itself, or its bytes escaped when it is not UTF-8."""
    return name if is_utf8(name) else ascii(os.fsencode(name))[2:-1]


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file (else OSError): a FIFO or device never blocks
    or streams endlessly."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (FIFO, device or socket)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
