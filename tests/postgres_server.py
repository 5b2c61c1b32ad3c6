"""A real PostgreSQL server on 127.0.0.1 for the tests: Debian's binaries, password auth.

``.ci/run`` starts one before the suite (``python -m tests.postgres_server start``) and exports
``MPQ_TEST_POSTGRES_URL`` and ``MPQ_TEST_PGDATA``; the distributed tests use that server and
restart it as a fault. Without those variables (a developer's machine) the tests start their
own, and skip only where no PostgreSQL binaries are installed.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` user (``runuser``), with its data folder owned by that user.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

USER = "mpq"  # the database superuser the tests connect as (with a password)


def binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding ``pg_ctl``, or ``pg_ctl`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


class PostgresServer:
    """One server: ``initdb`` into ``data``, ``pg_ctl`` start/stop/restart, a URL per database."""

    def __init__(self, data: Path, port: int, password: str) -> None:
        self.data = data
        self.port = port
        self.password = password
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (apt-get install postgresql)")
        self.bin = bin_dir

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str, timeout_s: float = 120) -> str:
        full = [str(self.bin / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            full = ["runuser", "-u", "postgres", "--", *full]
        out = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(out.stderr or out.stdout)[-1500:]}")
        return out.stdout

    def init(self) -> PostgresServer:
        self.data.mkdir(parents=True, exist_ok=True)
        pwfile = self.data.parent / f".{self.data.name}.pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
            os.chmod(self.data.parent, 0o755)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8",
                "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink()
        return self

    def start(self) -> PostgresServer:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.data} -c fsync=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options,
            "-w", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (password included: the tests' own secret)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    @classmethod
    def from_env(cls) -> PostgresServer | None:
        """The server ``.ci/run`` started, when it exported its URL and data folder."""
        url, data = os.environ.get("MPQ_TEST_POSTGRES_URL"), os.environ.get("MPQ_TEST_PGDATA")
        if not url or not data:
            return None
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        return cls(Path(data), int(parsed.port or 5432), str(parsed.password))

    @classmethod
    def fresh(cls, root: Path | None = None, port: int | None = None) -> PostgresServer:
        """Initialise and start a server of the tests' own."""
        from tests.mlflow_server import free_port

        root = root or Path(tempfile.mkdtemp(prefix="mpq-pg-"))
        server = cls(root / "data", port or free_port(), secrets.token_hex(12))
        return server.init().start()


def wait_until_up(server: PostgresServer, timeout_s: float = 60) -> None:
    import sqlalchemy

    deadline = time.monotonic() + timeout_s
    while True:
        engine = sqlalchemy.create_engine(server.url())
        try:
            with engine.connect():
                return
        except sqlalchemy.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
        finally:
            engine.dispose()


def main() -> None:
    """``start ROOT [PORT]``: a fresh server (PORT 0 or none: a free one); prints the two
    ``export`` lines for the shell. ``stop ROOT``: stop it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("root", type=Path)
    parser.add_argument("port", type=int, nargs="?", default=0)
    args = parser.parse_args()
    if args.action == "stop":
        if (args.root / "data" / "postmaster.pid").exists():
            PostgresServer(args.root / "data", 0, "").stop()
        return
    if (args.root / "data" / "postmaster.pid").exists():
        raise SystemExit(f"a server already runs in {args.root}")
    shutil.rmtree(args.root, ignore_errors=True)
    server = PostgresServer.fresh(args.root, args.port or None)
    wait_until_up(server)
    print(f"export MPQ_TEST_POSTGRES_URL={server.url()}")
    print(f"export MPQ_TEST_PGDATA={server.data}")


if __name__ == "__main__":
    main()
