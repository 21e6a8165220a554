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

GUARD_LEASE = 30.0  # a stale-lock breaker holds its guard for milliseconds


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
                _break_stale(path, lease)
                continue
            if time.monotonic() > deadline:
                raise EnvironmentProblem(
                    f"{path}: held by another hpcfed for {age:.0f}s; try again"
                ) from None
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


def _break_stale(path: Path, lease: float) -> None:
    """Remove a stale lock, one breaker at a time.

    Several waiters may judge the same lock stale at once; removing it blindly lets a slow one
    delete the fresh lock a fast one has just made. So breakers serialise on a guard file, look
    again under it, and move the lock aside only if it is still the stale one (same inode); a
    fresh lock moved by mistake is linked back (link() is atomic: it fails if a newer one exists).
    """
    guard = path.with_name(f"{path.name}.break")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > GUARD_LEASE:  # a breaker that crashed
                guard.unlink()
        time.sleep(0.01)
        return
    try:
        st = path.stat()
        if time.time() - st.st_mtime <= lease:
            return  # someone else broke it and a new holder has it
        moved = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
        os.rename(path, moved)
        try:
            if os.stat(moved).st_ino != st.st_ino:
                with contextlib.suppress(FileExistsError):
                    os.link(moved, path)
        finally:
            moved.unlink()
    except FileNotFoundError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()
