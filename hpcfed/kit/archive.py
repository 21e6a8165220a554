"""Unpack a dashboard's PIN-protected kit zip without trusting its member names.

The dashboard zips with `zip -rq -P <pin>` (classic ZipCrypto, which `zipfile` decrypts). Members
are written one by one with O_EXCL and mode 0600: no absolute paths, no `..`, no links, and a
size cap, so a hostile or broken archive cannot write outside the target or fill the disk.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import List, Optional, Set, Tuple

from hpcfed.errors import KitError

ZIP_MAGIC = b"PK\x03\x04"
MAX_MEMBERS = 2000
MAX_TOTAL_BYTES = 64 * 1024 * 1024


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def _safe_parts(name: str) -> Optional[tuple]:
    if "\\" in name or name.startswith("/"):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def _check_layout(members: List[zipfile.ZipInfo], label: str) -> None:
    """One entry per path, and no path both a file and a folder (`a` and `a/b`): either would
    make the unpacked kit depend on member order, so the archive is refused whole."""
    files: Set[Tuple[str, ...]] = set()
    folders: Set[Tuple[str, ...]] = set()
    for info in members:
        parts = _safe_parts(info.filename)
        if not parts:
            continue
        folders.update(parts[:i] for i in range(1, len(parts)))
        if info.is_dir():
            folders.add(parts)
        elif parts in files:
            raise KitError(
                f"the {label} archive holds {info.filename!r} twice; refusing to unpack it"
            )
        else:
            files.add(parts)
    clash = sorted(files & folders)
    if clash:
        raise KitError(
            f"the {label} archive holds {'/'.join(clash[0])!r} as both a file and a folder; "
            "refusing to unpack it"
        )


def unpack_kit(data: bytes, target: Path, pin: Optional[str], label: str = "kit") -> Path:
    """Unpack zip bytes into the empty directory `target`; return the kit root inside it.

    Kits from NVFlare 2.6+ have startup/ at the top; older ones wrap everything in one folder
    named after the site, which is then the root returned.
    """
    if not is_zip(data):
        raise KitError(f"the {label} download is not a zip archive")
    pwd = pin.encode() if pin else None
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise KitError(f"the {label} download is a damaged zip archive ({exc})") from None
    members = archive.infolist()
    if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_TOTAL_BYTES:
        raise KitError(
            f"the {label} archive is implausibly large for a startup kit; refusing to unpack it"
        )
    for info in members:
        if _safe_parts(info.filename) is None:
            raise KitError(
                f"the {label} archive holds an unsafe path {info.filename!r}; refusing to unpack it"
            )
    _check_layout(members, label)
    for info in members:
        parts = _safe_parts(info.filename)
        if not parts:
            continue
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise KitError(
                f"the {label} archive holds a symbolic link {info.filename!r}; refusing to unpack it"
            )
        dest = target.joinpath(*parts)
        if info.is_dir():
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            content = archive.read(info, pwd=pwd)
        except RuntimeError as exc:  # zipfile's "Bad password for file"
            raise KitError(f"cannot decrypt the {label} archive with its PIN ({exc})") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise KitError(f"the {label} archive is damaged ({exc})") from None
        executable = bool(mode & 0o100)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700 if executable else 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
    if (target / "startup").is_dir():
        return target
    entries = [p for p in target.iterdir()]
    if len(entries) == 1 and (entries[0] / "startup").is_dir():
        return entries[0]
    raise KitError(f"the {label} archive has no startup/ folder: not an NVFlare startup kit")
