"""YAML text -> data, remembered by content so that a submit need not import PyYAML at all.

Every submit reads the role table, the site profiles and HPCFED_SITE__* values, all YAML, and
PyYAML's import alone was ~7 ms of a submit that should feel like sbatch (issue 17). A parse is
kept as JSON in the user's cache (0700), under the SHA-256 of the text: an edited file is new
text, so a cached parse is never stale. Only data that JSON gives back unchanged is kept (no
dates, no non-string keys); the rest, and every error, goes through PyYAML (libyaml's C parser
where PyYAML has it) each time. A cache that cannot be read or written only costs the parse.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Tuple

from hpcfed import paths


class YamlError(ValueError):
    """Text that is not YAML: the problem and, where the parser knows it, the line (1-based)."""

    def __init__(self, problem: str, line: Optional[int] = None):
        super().__init__(problem)
        self.problem = problem
        self.line = line


def safe_load(text: str) -> Any:
    """yaml.safe_load(text), from the cache when this text was parsed before; YamlError."""
    key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    cached = _read(key)
    if cached is not None:
        return cached[0]
    data = parse(text)
    _write(key, data)
    return data


def parse(text: str) -> Any:
    """yaml.safe_load through libyaml's C parser where PyYAML has it (the same safe subset)."""
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"YAML error: {exc}") from None


def _dir() -> str:
    return str(paths.cache_dir() / "yaml")


def _read(key: str) -> Optional[Tuple[Any]]:
    """(data,) from the cache, or None when this text is not there (data itself may be None)."""
    try:
        with open(os.path.join(_dir(), key + ".json"), encoding="utf-8") as f:
            return (json.load(f),)
    except (OSError, ValueError):
        return None


def _write(key: str, data: Any) -> None:
    try:
        text = json.dumps(data)
        if json.loads(text) != data:  # JSON would change it (e.g. int keys): parse it each time
            return
        from hpcfed.tunnel.files import write_private  # on a miss only: it imports secrets

        directory = paths.private_mkdir(paths.cache_dir() / "yaml")
        write_private(directory / f"{key}.json", text)
    except (OSError, TypeError, ValueError):
        pass
