"""A throwaway PostgreSQL server for tests: ``initdb`` into a temporary folder, start it on a
free loopback port, hand out its URL, and always stop it (``pg_ctl stop -m immediate``).

PostgreSQL refuses to run as root, so under root every server command runs as an
unprivileged user (``postgres`` if the packages created it, else ``nobody``) that owns the
folder. The binaries are found on PATH or where Debian and RHEL packages put them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresError", "PostgresServer", "find_bin_dir", "free_port", "postgres_server"]

_TOOLS = ("initdb", "pg_ctl", "postgres", "psql")
_PACKAGE_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")


class PostgresError(RuntimeError):
    """The throwaway server could not be created, started or given a database."""


def find_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl, postgres and psql: PATH first, then the newest packaged version."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    packaged = glob.glob(_PACKAGE_DIRS[0]) + glob.glob(_PACKAGE_DIRS[1]) + glob.glob(_PACKAGE_DIRS[2])
    candidates += sorted((Path(p) for p in packaged), key=_version_key, reverse=True)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in _TOOLS):
            return folder
    return None


def _version_key(folder: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in str(folder)).split()
    return tuple(int(d) for d in digits)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresError("running as root and neither a 'postgres' nor a 'nobody' user exists to run the server")


class PostgresServer:
    """One server in its own temporary folder; ``start()``, ``create_database()``, ``stop()``."""

    def __init__(self, bin_dir: Path, *, superuser: str = "postgres") -> None:
        self.bin_dir, self.superuser = bin_dir, superuser
        self.user = _server_user()
        # Under root the folder must be reachable by the server's user: pytest's tmp_path is not.
        self.root = Path(tempfile.mkdtemp(prefix="lrsearch-pg-", dir="/tmp" if self.user else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port: int | None = None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            if shutil.which("runuser"):
                command = ["runuser", "-u", self.user, "--", *command]
            else:
                command = ["su", self.user, "-s", "/bin/sh", "-c", shlex.join(command)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              stdin=subprocess.DEVNULL, check=False)

    def _check(self, done: subprocess.CompletedProcess[str], what: str) -> None:
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise PostgresError(f"{what} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}"
                                f"\nserver log:\n{log}")

    def start(self, attempts: int = 3) -> None:
        self._check(self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", self.superuser,
                              "-E", "UTF8", "--no-locale", "--no-sync"), "initdb")
        for attempt in range(attempts):
            self.port = free_port()
            # Throwaway data: durability settings off; Unix socket in our folder, not /var/run.
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            done = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                             "-w", "-t", "60", "start", timeout=90)
            if done.returncode == 0:
                return
            if attempt == attempts - 1:  # the port may have been taken between probe and bind
                self._check(done, "pg_ctl start")

    def url(self, database: str) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; its SQLAlchemy URL."""
        done = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, "-d", "postgres",
                         "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{name}"')
        self._check(done, f"creating database {name!r}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server at once (data is thrown away) and delete the folder; never raises."""
        try:
            if (self.data / "postmaster.pid").is_file():
                done = self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "immediate", "-w", "-t", "30",
                                 timeout=45)
                if done.returncode != 0:
                    self._kill_postmaster()
        except (OSError, subprocess.SubprocessError):
            self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Last resort: the server we started, by the id in its own pid file."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def postgres_server(database: str = "lrsearch", bin_dir: Path | None = None) -> Iterator[str]:
    """Start a server, create ``database``, yield its URL; stop the server however the block ends."""
    bin_dir = bin_dir or find_bin_dir()
    if bin_dir is None:
        raise PostgresError("PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server.create_database(database)
    finally:
        server.stop()
