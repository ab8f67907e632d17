"""Files out: every file the package writes goes through a temporary file and a rename, so a
crash, a full disk or Ctrl-C never leaves a half-written file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
