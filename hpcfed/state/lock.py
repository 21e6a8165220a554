"""An NFS-safe lock: exclusive creation of a lock file that names its holder and the holder's lease.

The holder owns its lease: it writes the lease into the lock file and renews it (a heartbeat
thread touches the file) for as long as it holds the lock, so a lock is stale only when its
holder stopped renewing it - crashed, killed, or its machine gone - for longer than the lease it
chose. A waiter never applies a lease of its own to someone else's lock: however long a live
holder keeps the lock (a rejoin over a slow SSH link), it waits or gives up, never breaks it.

The lock file appears with its content at once (written to a unique name, then hard-linked:
link() fails if the lock exists, atomically, on NFS too). A stale lock is broken by renaming it
to a unique name (atomic), so two processes that both see it stale cannot both take it over.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from hpcfed.errors import EnvironmentProblem

GUARD_LEASE = 30.0  # a stale-lock breaker holds its guard for milliseconds
RENEWALS_PER_LEASE = 4  # the holder touches its lock this often per lease: one missed is fine


class LockBusy(EnvironmentProblem):
    """Another live hpcfed holds the lock (not stale): what it is doing is in progress."""


def this_host() -> str:
    """This machine's name, as lock owners and temp files record it (socket.gethostname()'s
    value, without importing socket on every command)."""
    return os.uname().nodename


@contextlib.contextmanager
def lease_lock(
    path: Path, lease: float = 60.0, wait: float = 30.0, poll: float = 0.05
) -> Iterator[str]:
    """Hold `path` (a lock file) for the block; wait up to `wait` seconds for another holder.

    `lease`: how long after this process stops renewing (crash) others may break the lock.
    Yields the holder token written in the lock file.
    """
    token = f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex}"
    content = json.dumps(
        {
            "holder": token,
            "since": time.time(),
            "lease": lease,
            "host": this_host(),
            "pid": os.getpid(),
        }
    )
    deadline = time.monotonic() + wait
    while not _create(path, content):
        held = _holder(path, default_lease=lease)
        if held is None:
            continue  # released meanwhile
        age, their_lease = held
        if age > their_lease:
            _break_stale(path, default_lease=lease)
            continue
        if time.monotonic() > deadline:
            raise LockBusy(
                f"{path}: held by another hpcfed (renewed {age:.0f}s ago, still alive); "
                f"try again when it is done"
            )
        time.sleep(poll)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(path, token, lease / RENEWALS_PER_LEASE, stop), daemon=True
    )
    renewer.start()
    try:
        yield token
    finally:
        stop.set()
        renewer.join()
        # Remove only our own lock (it may have been broken while this process was frozen).
        if _owner(path) == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _create(path: Path, content: str) -> bool:
    """Make the lock file with `content` if there is none; True when this process made it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.new")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS: the reply to a link() that succeeded can be lost; the link count tells.
            return os.stat(tmp).st_nlink == 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _owner(path: Path) -> Optional[str]:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads(path.read_text()).get("holder"))
    return None


def _holder(path: Path, default_lease: float) -> Optional[tuple[float, float]]:
    """(seconds since the holder last renewed, the holder's lease), None when there is no lock.

    A lock written without a lease (an older hpcfed) gets the waiter's lease; one whose holder
    is provably dead (a process of this machine that no longer exists: killed, crashed) has
    none left."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    lease = data.get("lease") if isinstance(data, dict) else None
    if not isinstance(lease, (int, float)) or isinstance(lease, bool):
        lease = default_lease
    if isinstance(data, dict) and _dead_here(data.get("host"), data.get("pid")):
        lease = -1.0
    return age, float(lease)


def _dead_here(host: object, pid: object) -> bool:
    """True when `pid` on `host` is this machine's and no process has it any more. Anything
    unsure (another machine, a process of another user, a reused pid) counts as alive."""
    if host != this_host() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # EPERM: it exists
    return False


def _renew(path: Path, token: str, every: float, stop: threading.Event) -> None:
    """The holder's heartbeat: touch the lock while it is still ours."""
    while not stop.wait(every):
        if _owner(path) != token:
            return  # broken while this process was frozen: nothing of ours to renew
        with contextlib.suppress(OSError):
            os.utime(path)


def _break_stale(path: Path, default_lease: float) -> None:
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
        held = _holder(path, default_lease)
        if held is None or held[0] <= held[1]:
            return  # renewed, or someone else broke it and a new holder has it
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
