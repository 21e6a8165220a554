"""An NFS-safe lock: exclusive create of a lock file, with a lease so a crashed holder's lock
expires instead of blocking forever. A stale lock is broken by renaming it to a unique name
(atomic), so two processes that both see it stale cannot both take it over."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from hpcfed.errors import EnvironmentProblem


@contextlib.contextmanager
def lease_lock(path: Path, lease: float = 60.0, wait: float = 30.0, poll: float = 0.05):
    """Hold `path` (a lock file) for the block; wait up to `wait` seconds for another holder."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > lease:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}"))
                    for old in path.parent.glob(f"{path.name}.stale.*"):
                        with contextlib.suppress(FileNotFoundError):
                            old.unlink()
                continue
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"{path}: held by another hpcfed for {age:.0f}s; try again")
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"holder": token, "since": time.time()}, f)
        break
    try:
        yield token
    finally:
        # Remove only our own lock (a lease may have expired and been taken by someone else).
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("holder") == token:
                path.unlink()
