"""Files out: every file the package writes goes through a temporary file and a rename, so a
crash, a full disk or Ctrl-C never leaves a half-written file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import SaliencyError


def atomic_write(path, write_fn) -> Path:
    """Write through a temporary file in the same folder, then rename: no partial files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_dir(path, write_fn, own_files, what: str) -> Path:
    """Write the folder `path` whole or not at all: `write_fn(tmp)` fills a temporary folder beside
    it, which then replaces `path`. A folder holding anything but `own_files` (what an earlier save
    of the same kind wrote) is refused, never deleted."""
    import shutil

    path = check_writable_dir(path, what)
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in own_files)
        if others:
            raise SaliencyError(f"will not replace {path}: it is a folder holding other files "
                                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}), not {what}; "
                                "give a new or empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        write_fn(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(path, what: str = "output") -> Path:
    """`path` as a folder that can be made or replaced: refused (SaliencyError naming it) when it is
    an existing file, or when its nearest existing parent is not a folder a file can be written in
    (tried with a temporary file, so a read-only mount or a pseudo file system counts too).
    Checked before any work, so a long run never ends in an error at the save; nothing is made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaliencyError(f"cannot write {what} to {path}: it is an existing file (give a folder path)")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SaliencyError(f"cannot write {what} to {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(prefix=".tmp-check-", dir=parent):
            pass
    except OSError as err:
        raise SaliencyError(f"cannot write {what} to {path}: the folder {parent} is not writable "
                            f"({err.strerror or err})") from None
    return path


def check_writable_file(path, what: str = "output") -> Path:
    """`path` as a file that can be written: refused (SaliencyError naming it) when it is a folder,
    a file that cannot be replaced, or under a parent that is not a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise SaliencyError(f"cannot write {what} to {path}: it is a folder (give a file name)")
    check_writable_dir(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise SaliencyError(f"cannot write {what} to {path}: the file exists and is not writable")
    return path
