"""Files that hold secrets: written atomically, mode 0600 from the first byte."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: Path | str, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` as a 0600 file owned by us, replacing it atomically.

    The temporary file has a random name and is created with O_EXCL|O_NOFOLLOW: in a shared
    (sticky) directory another user may have pre-created any predictable name, or a symlink with
    it, to get the secret written into a file they own. A name taken is retried, never reused.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path.parent}: cannot create a unique temporary file")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (a crash must not leave the old secret or none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
