"""Commands on this machine (the login node itself, or the local test cluster)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

from hpcfed.errors import EnvironmentProblem, SchedulerUnavailable
from hpcfed.runner import Result, command_env


class LocalRunner:
    where = "local"

    def __init__(self, home: Optional[str] = None):
        self.home = Path(home or os.path.expanduser("~"))

    def _path(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.home / p

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[str] = None,
        timeout: float = 30,
    ) -> Result:
        try:
            proc = subprocess.run(
                list(argv),
                env=command_env(os.environ, env),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=str(self.home) if self.home.is_dir() else None,
            )
        except FileNotFoundError:
            raise EnvironmentProblem(f"{argv[0]}: command not found on this machine") from None
        except subprocess.TimeoutExpired:
            raise SchedulerUnavailable(f"{argv[0]} did not answer within {timeout:g}s") from None
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def read_file(self, path: str, offset: int = 0) -> bytes:
        with open(self._path(path), "rb") as f:
            f.seek(offset)
            return f.read()

    def mkdirs(self, path: str) -> None:
        self._path(path).mkdir(parents=True, exist_ok=True)

    def write_file(self, path: str, data: bytes) -> None:
        from hpcfed.tunnel.files import write_private

        write_private(self._path(path), data)

    def close(self) -> None:
        pass
