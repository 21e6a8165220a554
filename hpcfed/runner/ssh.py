"""Commands on a login node over SSH (paramiko), for users submitting from a laptop.

Host keys are checked against known_hosts and an unknown host is refused unless the profile says
`accept_unknown_host: true`; authentication is a key file, the SSH agent or the default keys.
One connection serves every command of an hpcfed invocation; scripts go over the channel's stdin
and files come back over SFTP, so nothing is copied around by hand.
"""

from __future__ import annotations

import os
import shlex
import socket
from typing import Mapping, Optional, Sequence

from hpcfed.errors import ConfigError, EnvironmentProblem, NotFound, SchedulerUnavailable
from hpcfed.runner import Result


class SshRunner:
    def __init__(self, settings, connect_timeout: float = 15):
        if not settings.host:
            raise ConfigError("scheduler.ssh.host: not set in the site profile")
        self.settings = settings
        self.user = settings.user or os.environ.get("USER") or None
        self.where = f"{self.user + '@' if self.user else ''}{settings.host}:{settings.port}"
        self._connect_timeout = connect_timeout
        self._client = None
        self._sftp = None

    def _connect(self):
        if self._client is not None:
            return self._client
        import paramiko

        s = self.settings
        client = paramiko.SSHClient()
        known_hosts = os.path.expanduser(s.known_hosts or "~/.ssh/known_hosts")
        try:
            client.load_host_keys(known_hosts)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as exc:
            raise EnvironmentProblem(f"{known_hosts}: cannot read known hosts: {exc}") from None
        if s.accept_unknown_host:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = os.path.expanduser(s.key) if s.key else None
        if key and not os.path.isfile(key):
            raise EnvironmentProblem(f"scheduler.ssh.key: {key}: no such file")
        try:
            client.connect(
                s.host,
                port=s.port,
                username=self.user,
                key_filename=key,
                allow_agent=True,
                look_for_keys=key is None,
                timeout=self._connect_timeout,
                banner_timeout=self._connect_timeout,
                auth_timeout=self._connect_timeout,
            )
        except paramiko.BadHostKeyException:
            raise EnvironmentProblem(
                f"{self.where}: host key does NOT match {known_hosts} - refusing to connect "
                "(if the host was really reinstalled, remove its old line with ssh-keygen -R)"
            ) from None
        except paramiko.AuthenticationException:
            raise EnvironmentProblem(
                f"{self.where}: authentication failed (scheduler.ssh.key / SSH agent)"
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise EnvironmentProblem(
                    f"{self.where}: unknown host key (not in {known_hosts}); check and add it, "
                    f"e.g. ssh -p {s.port} {s.host} once, or ssh-keyscan"
                ) from None
            raise SchedulerUnavailable(f"{self.where}: SSH failed: {exc}") from None
        except (OSError, socket.timeout) as exc:
            raise SchedulerUnavailable(f"{self.where}: cannot connect: {exc}") from None
        self._client = client
        return client

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[str] = None,
        timeout: float = 30,
    ) -> Result:
        # Environment goes in the command line (sshd's AcceptEnv is rarely open); it holds
        # scheduler settings like SLURM_CONF, never secrets.
        prefix = ["env"] + [f"{k}={v}" for k, v in (env or {}).items()] if env else []
        command = " ".join(shlex.quote(a) for a in prefix + list(argv))
        client = self._connect()
        try:
            stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
            if input is not None:
                stdin.write(input)
            stdin.channel.shutdown_write()
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except socket.timeout:
            raise SchedulerUnavailable(
                f"{self.where}: {argv[0]} did not answer within {timeout:g}s"
            ) from None
        except Exception as exc:  # paramiko.SSHException, EOFError on a dropped connection
            raise SchedulerUnavailable(f"{self.where}: SSH command failed: {exc}") from None
        if code == 127 and "not found" in err:
            raise EnvironmentProblem(f"{self.where}: {argv[0]}: command not found")
        return Result(code, out, err)

    def _sftp_client(self):
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
        return self._sftp

    def read_file(self, path: str, offset: int = 0) -> bytes:
        try:
            with self._sftp_client().open(path, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                raise FileNotFoundError(path) from None
            raise SchedulerUnavailable(f"{self.where}: cannot read {path}: {exc}") from None

    def mkdirs(self, path: str) -> None:
        res = self.run(["mkdir", "-p", "--", path])
        if res.returncode != 0:
            raise NotFound(f"{self.where}: cannot create {path}: {res.stderr.strip()}")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._client is not None:
            self._client.close()
        self._client = self._sftp = None
