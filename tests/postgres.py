"""A throwaway PostgreSQL server for the tests and benchmarks that run the Dagster instance on it:
Debian's `postgresql` binaries (.ci/run installs them), a cluster in a temporary folder on a free
port, trust auth on localhost, one database per instance. As root (CI), the server runs as the
`postgres` user the package creates: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def binaries() -> Path | None:
    """The newest installed server's bin folder (/usr/lib/postgresql/<major>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class Postgres:
    """One server: `url(db)` for a database on it, `database()` for a new empty one."""

    def __init__(self, port: int, fast: bool = True):
        # its own folder under /tmp: the postgres user must reach it (pytest's tmp and mkdtemp's parents are root's alone)
        root = Path(tempfile.mkdtemp(prefix="kun-postgres-"))
        self.root, self.port = root, port
        self.data, self.log = root / "data", root / "server.log"
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        self._as_user = os.geteuid() == 0
        if self._as_user:
            shutil.chown(root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        # fast: no fsync, for tests (a crashed test server is thrown away); benchmarks keep Postgres's defaults
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200" + (
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off" if fast else ""
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_user:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def url(self, db: str = "postgres") -> str:
        """SQLAlchemy's URL, naming the driver dagster-postgres installs (SQLAlchemy 2.1 would pick psycopg 3)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg2

        name = f"dagster_{uuid.uuid4().hex[:10]}"
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def instance_yaml(home: Path, url: str | None) -> Path:
    """$DAGSTER_HOME/dagster.yaml as `kun demo` writes it (the repo's: gpu pool, run queue, retries,
    run monitoring), its runs, events and schedules on PostgreSQL at `url` (None: SQLite)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "dagster.yaml").read_text())
    if url is not None:
        cfg["storage"] = {"postgres": {"postgres_url": url}}
    path = home / "dagster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_ready(pg: Postgres, timeout: float = 30) -> None:
    import psycopg2

    deadline = time.time() + timeout
    while True:
        try:
            psycopg2.connect(pg.dsn()).close()
            return
        except psycopg2.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
