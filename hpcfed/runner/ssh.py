"""Commands on a login node over SSH (paramiko), for users submitting from a laptop.

Host keys are checked against known_hosts and an unknown host is refused unless the profile says
`accept_unknown_host: true`; authentication is a key file, the SSH agent or the default keys.
One connection serves every command of an hpcfed invocation; scripts go over the channel's stdin
and files come back over SFTP, so nothing is copied around by hand.

The user's known_hosts is only ever read, by our own reader: paramiko's cannot parse OpenSSH's
`@cert-authority`/`@revoked` markers, and its AutoAddPolicy rewrites the whole file (comments
dropped). Keys accepted with `accept_unknown_host` are appended to hpcfed's own file instead.
"""

from __future__ import annotations

import binascii
import os
import secrets
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from hpcfed import paths
from hpcfed.errors import ConfigError, EnvironmentProblem, NotFound, SchedulerUnavailable
from hpcfed.runner import Result

KeyId = Tuple[str, str]  # (key type, base64): how @revoked names a key


def accepted_hosts_file() -> Path:
    """Where host keys accepted under `accept_unknown_host: true` are remembered (ours alone)."""
    return paths.state_dir() / "known_hosts"


class KnownHosts(NamedTuple):
    keys: Any  # paramiko.HostKeys
    revoked: Set[KeyId]
    cert_authorities: int  # @cert-authority lines skipped


def read_known_hosts(path: Path) -> KnownHosts:
    """The keys, revoked keys and skipped CA lines of an OpenSSH known_hosts file (only read).

    `@revoked` keys are refused for every host. `@cert-authority` lines are skipped: paramiko
    cannot check host certificates, so such a host needs a plain key line (ssh-keyscan). Lines
    this reader cannot parse are skipped too, as OpenSSH does.
    """
    import paramiko
    from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

    host_keys = paramiko.HostKeys()
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return KnownHosts(host_keys, set(), 0)
    except OSError as exc:
        raise EnvironmentProblem(f"{path}: cannot read known hosts: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    revoked: Set[KeyId] = set()
    cert_authorities = 0
    for line in lines:
        fields = line.split()
        if fields[0] == "@revoked" and len(fields) >= 4:
            revoked.add((fields[2], fields[3]))
        cert_authorities += fields[0] == "@cert-authority"
    for number, line in enumerate(lines):
        if line.startswith("@"):
            continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (InvalidHostKey, paramiko.SSHException, ValueError, binascii.Error):
            continue
        if entry is None or entry.key is None:
            continue
        if (entry.key.get_name(), entry.key.get_base64()) in revoked:
            continue  # a revoked key is not a known key: the policy below refuses it
        for name in entry.hostnames:
            host_keys.add(name, entry.key.get_name(), entry.key)
    return KnownHosts(host_keys, revoked, cert_authorities)


class _Refused(Exception):
    """Raised by the host key policy before any authentication; becomes an hpcfed error."""


def _policy(revoked: Set[KeyId], accept: bool, remember: Path) -> Any:
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        """Called by paramiko for a host key that no known_hosts line vouches for."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            if (key.get_name(), key.get_base64()) in revoked:
                raise _Refused(f"{hostname}: its host key is marked @revoked in known_hosts")
            if not accept:
                raise _Refused("unknown")
            _remember(remember, hostname, key)
            client.get_host_keys().add(hostname, key.get_name(), key)

    return Policy()


def _remember(path: Path, hostname: str, key: Any) -> None:
    """Append one line to hpcfed's own known_hosts (never rewrite a file, never the user's)."""
    from paramiko.hostkeys import HostKeyEntry

    paths.private_mkdir(path.parent)
    line = HostKeyEntry([hostname], key).to_line()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    fingerprint = key.fingerprint  # "SHA256:..."
    print(
        f"hpcfed: accepted the unknown host key of {hostname} ({fingerprint}) "
        f"(accept_unknown_host); remembered in {path}",
        file=sys.stderr,
    )


class SshRunner:
    def __init__(self, settings: Any, connect_timeout: float = 15, io_timeout: float = 30):
        if not settings.host:
            raise ConfigError("scheduler.ssh.host: not set in the site profile")
        self.settings = settings
        self.user = settings.user or os.environ.get("USER") or None
        self.where = f"{self.user + '@' if self.user else ''}{settings.host}:{settings.port}"
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout  # SFTP reads: a hung login node must not block forever
        self._client: Any = None
        self._sftp: Any = None

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        import paramiko

        s = self.settings
        client = paramiko.SSHClient()
        known_hosts = Path(os.path.expanduser(s.known_hosts or "~/.ssh/known_hosts"))
        users, own = read_known_hosts(known_hosts), read_known_hosts(accepted_hosts_file())
        revoked = users.revoked | own.revoked
        for hostname, by_type in list(users.keys.items()) + list(own.keys.items()):
            for keytype, key in by_type.items():
                if (keytype, key.get_base64()) not in revoked:
                    client.get_host_keys().add(hostname, keytype, key)
        client.set_missing_host_key_policy(
            _policy(revoked, s.accept_unknown_host, accepted_hosts_file())
        )
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
        except _Refused as exc:
            client.close()
            if str(exc) != "unknown":
                raise EnvironmentProblem(f"{self.where}: {exc} - refusing to connect") from None
            ca = (
                " (its @cert-authority lines are skipped: host certificates cannot be checked)"
                if users.cert_authorities
                else ""
            )
            raise EnvironmentProblem(
                f"{self.where}: unknown host key (not in {known_hosts}{ca}); check and add it, "
                f"e.g. ssh -p {s.port} {s.host} once, or ssh-keyscan"
            ) from None
        except paramiko.BadHostKeyException:
            client.close()
            raise EnvironmentProblem(
                f"{self.where}: host key does NOT match {known_hosts} - refusing to connect "
                "(if the host was really reinstalled, remove its old line with ssh-keygen -R)"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise EnvironmentProblem(
                f"{self.where}: authentication failed (scheduler.ssh.key / SSH agent)"
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            raise SchedulerUnavailable(f"{self.where}: SSH failed: {exc}") from None
        except (OSError, socket.timeout) as exc:
            client.close()
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

    def _sftp_client(self) -> Any:
        if self._sftp is None:
            self._sftp = self._connect().open_sftp()
            # Every SFTP request waits at most this long for its answer (paramiko's default is
            # forever): rejoin reads logs while it holds a deployment's lock.
            self._sftp.get_channel().settimeout(self._io_timeout)
        return self._sftp

    def read_file(self, path: str, offset: int = 0) -> bytes:
        try:
            with self._sftp_client().open(path, "rb") as f:
                f.seek(offset)
                return bytes(f.read())
        except FileNotFoundError:
            raise
        except socket.timeout:
            self.close()  # the channel is in an unknown state; the next call reconnects
            raise SchedulerUnavailable(
                f"{self.where}: reading {path} got no answer within {self._io_timeout:g}s"
            ) from None
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                raise FileNotFoundError(path) from None
            raise SchedulerUnavailable(f"{self.where}: cannot read {path}: {exc}") from None

    def mkdirs(self, path: str) -> None:
        res = self.run(["mkdir", "-p", "--", path])
        if res.returncode != 0:
            raise NotFound(f"{self.where}: cannot create {path}: {res.stderr.strip()}")

    def write_file(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{secrets.token_hex(8)}.tmp"
        sftp = self._sftp_client()
        try:
            # 0600 before the first byte: an input may be something the user keeps private.
            with sftp.open(tmp, "wbx") as f:
                f.chmod(0o600)
                f.write(data)
            sftp.posix_rename(tmp, path)
        except socket.timeout:
            self.close()
            raise SchedulerUnavailable(
                f"{self.where}: writing {path} got no answer within {self._io_timeout:g}s"
            ) from None
        except OSError as exc:
            raise SchedulerUnavailable(f"{self.where}: cannot write {path}: {exc}") from None

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._client is not None:
            self._client.close()
        self._client = self._sftp = None
