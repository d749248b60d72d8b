"""A private PostgreSQL server under the data directory, from the pip-installed `pgserver` binaries.

Why: `vna serve` must run on a fresh machine with no database to point at. PostgreSQL refuses to
run as root, so when we are root the cluster is owned by and run as an unprivileged system user
(`vna-pg`), created on first use.

The server listens on 127.0.0.1 only, on a free port chosen at each start (PostgreSQL records it in
``<pgdata>/postmaster.pid``), with a generated password (``<pgdata>/../pg-password``, mode 0600). A second
process pointed at the same data directory (``vna ae add`` while ``vna serve`` runs) finds the running
postmaster there and connects to it instead of starting another.

Example::

    pg = EmbeddedPostgres(Path("/var/lib/vna"))
    dsn = pg.ensure_running()      # blocking: call it in a thread from async code
    ...
    pg.stop()                      # only stops a server this object started
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from pathlib import Path

from archive.errors import ConfigError, DatabaseError

_SYSTEM_USER = "vna-pg"
_DATABASE = "vna"


def _bin_dir() -> Path:
    # Only the package's location is needed; importing it would run its module-level setup.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded database needs the `pgserver` package (pip install pgserver)")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ensure_system_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SYSTEM_USER],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """Give 'others' search (x) permission on every ancestor so the unprivileged user can reach path."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """Owns one PostgreSQL cluster in ``<data_dir>/pg``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pg"
        self._password_file = self.data_dir / "pg-password"
        self._started_here = False
        self._as_root = os.geteuid() == 0
        self._ids: tuple[int, int] | None = None

    # -- subprocess plumbing ---------------------------------------------------------------
    def _run(self, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._as_root:
            assert self._ids is not None
            kwargs = {"user": self._ids[0], "group": self._ids[1], "extra_groups": []}
        try:
            return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout,
                                  cwd="/", **kwargs)  # type: ignore[arg-type]
        except subprocess.CalledProcessError as exc:
            log = self.pgdata / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise DatabaseError(f"{Path(args[0]).name} failed: {exc.stderr.strip()} {tail}") from exc
        except subprocess.TimeoutExpired as exc:
            raise DatabaseError(f"{Path(args[0]).name} timed out after {timeout}s") from exc

    def _prepare_permissions(self) -> None:
        if not self._as_root:
            return
        self._ids = _ensure_system_user()
        bindir = _bin_dir()
        _make_traversable(bindir)
        for sub in (bindir, bindir.parent / "lib", bindir.parent / "share"):
            for root, dirs, files in os.walk(sub):
                for name in dirs + files:
                    p = Path(root) / name
                    if not p.is_symlink():
                        m = p.stat().st_mode
                        p.chmod(m | stat.S_IROTH | (stat.S_IXOTH if m & stat.S_IXUSR or p.is_dir() else 0))
        _make_traversable(self.data_dir)

    # -- lifecycle ---------------------------------------------------------------------------
    def _password(self) -> str:
        if not self._password_file.exists():
            self._password_file.write_text(secrets.token_hex(16))
            self._password_file.chmod(0o600)
        return self._password_file.read_text().strip()

    def _running_port(self) -> int | None:
        """Port of a live postmaster for this pgdata, from postmaster.pid (PostgreSQL's own record)."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        if len(lines) > 7 and lines[7].strip() not in ("ready", "starting"):
            return None
        return port

    def dsn(self, port: int) -> str:
        return f"postgresql://postgres:{self._password()}@127.0.0.1:{port}/{_DATABASE}"

    def ensure_running(self, *, timeout: float = 60.0) -> str:
        """Initialise (first time) and start the cluster unless it already runs; return its DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        port = self._running_port()
        if port is not None:
            return self.dsn(port)
        bindir = _bin_dir()
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)
            self.pgdata.mkdir(mode=0o700)
            pwfile = self.data_dir / ".pg-initpw"
            pwfile.write_text(self._password())
            if self._as_root:
                os.chown(self.pgdata, *self._ids)  # type: ignore[misc]
                os.chown(pwfile, *self._ids)  # type: ignore[misc]
            try:
                self._run([str(bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                           "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                           f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"], timeout=timeout)
            finally:
                pwfile.unlink(missing_ok=True)
        port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
                "-c max_connections=200 -c shared_buffers=256MB -c fsync=on "
                "-c wal_level=minimal -c max_wal_senders=0 -c max_wal_size=2GB")
        self._run([str(bindir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.pgdata / "log"),
                   "-w", "-t", str(int(timeout)), "-o", opts, "start"], timeout=timeout + 5)
        self._started_here = True
        if fresh:
            self._run([str(bindir / "psql"), self.dsn(port).rsplit("/", 1)[0] + "/postgres", "-q", "-c",
                       f"CREATE DATABASE {_DATABASE}"], timeout=timeout)
        return self.dsn(port)

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the server if this object started it (fast shutdown: open sessions are ended)."""
        if not self._started_here:
            return
        self._started_here = False
        self._run([str(_bin_dir() / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
                   "-t", str(int(timeout)), "stop"], timeout=timeout + 5)
