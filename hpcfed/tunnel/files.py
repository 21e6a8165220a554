"""Files that hold secrets: written atomically, mode 0600 from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path | str, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
