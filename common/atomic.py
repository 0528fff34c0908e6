"""Atomic file writes (temp file in the same folder, fsync, then `os.replace`) and bounded tail reads."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old or the new file, never a part."""
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_save_npy(path: str | Path, array: np.ndarray, mode: int = 0o600) -> Path:
    """np.save `array` to `path` atomically (streamed to the temporary file, no copy held in memory)."""
    return atomic_write_stream(path, lambda fh: np.save(fh, array, allow_pickle=False), mode)


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> Path:
    """`write(file)` streams the content into a temporary file that then replaces `path` atomically."""
    return _atomic_write(path, write, mode)


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> Path:
    """Temporary file in the same folder, `write(file)`, fsync, then `os.replace`. Mode: `mode`, else
    an existing file's mode, else the usual 0644 (mkstemp creates 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_create_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Create `path` with `data` only if it does not exist (FileExistsError otherwise), atomically: a
    temporary file is written and fsynced, then hard-linked to `path`, so that a full disk or a crash
    never leaves a short file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        _link_new(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Hard-link `tmp` to `path`, failing if `path` exists; where links are unsupported (some network
    or FUSE file systems), check then rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as JSON (indent 2, keys in insertion order, trailing newline) atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def _json_default(obj: Any) -> Any:
    """Serialise the few non-JSON types results commonly hold (paths, numpy values)."""
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_tail(path: str | Path, limit: int) -> bytes:
    """The last `limit` bytes of a file that keeps growing (a log): never the whole of it."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, os.SEEK_END) - limit))
        return handle.read(limit)
