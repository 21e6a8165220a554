"""Read the status files running tunnels keep (0600 JSON, rewritten every second)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from hpcfed.errors import NotFound
from hpcfed.tunnel.runner import status_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["status_file"] = str(path)
    host, here = data.get("host"), socket.gethostname()
    if data.get("state") != "stopped":
        if host and host != here:
            # a tunnel in a job on a compute node, read from a login node through the shared
            # home: its pid means nothing here, so say so instead of guessing "dead"
            data["state"] = "unknown"
            data["note"] = f"runs on {host}; cannot check its process from {here}"
        elif not _alive(int(data.get("pid", 0))):
            data["state"] = "dead"  # the process vanished without cleaning up (killed)
    age = time.time() - float(data.get("updated_at", 0))
    data["status_age_s"] = round(age, 1)
    if data.get("last_handshake_age_s") is not None and data["state"] in ("up", "connecting"):
        data["last_handshake_age_s"] = round(data["last_handshake_age_s"] + age, 1)
    return data


def collect(status_file: Optional[str] = None) -> list[dict]:
    if status_file:
        p = Path(status_file)
        if not p.is_file():
            raise NotFound(
                f"{p}: no tunnel status file (is `hpcfed tunnel up` running with --status-file {p}?)"
            )
        return [read(p)]
    d = status_dir()
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(read(p))
        except (OSError, ValueError):
            continue
    return out
