"""A real PostgreSQL server for the tests: Debian's binaries, a throw-away cluster on 127.0.0.1 and a free port.

``pg_server`` (session) runs ``initdb`` into a temporary folder and starts ``postgres`` (as the ``postgres`` user when
the tests run as root, which PostgreSQL refuses to be); ``registry_url`` gives each test a registry URL on SQLite and,
where the server can run, on a fresh PostgreSQL database of its own. Without the binaries the PostgreSQL cases skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

PASSWORD = "adaptkit-test"


@dataclass
class PgServer:
    host: str
    port: int

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql+psycopg://postgres:{password}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


def _bin_dir() -> Path | None:
    """The folder that holds initdb and postgres (Debian keeps them off PATH, under /usr/lib/postgresql/N/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs else None


def _run_as(user: pwd.struct_passwd | None, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    kwargs.setdefault("capture_output", True)
    return subprocess.run(args, user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                          env={**os.environ, "LC_ALL": "C"}, **kwargs)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session, stopped and deleted at the end."""
    pytest.importorskip("psycopg", reason='psycopg is not installed: pip install -e ".[dev,postgres]"')
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries are absent (apt-get install postgresql): PostgreSQL cases skipped")
    user = None
    root = Path(tempfile.mkdtemp(prefix="adaptkit-pg-"))
    if os.geteuid() == 0:  # postgres will not run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, pwfile, port = root / "data", root / "pw", free_port()
    pwfile.write_text(PASSWORD)
    if user:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    try:
        _run_as(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"])
        options = f"-h 127.0.0.1 -p {port} -k {root} -F -c synchronous_commit=off -c full_page_writes=off"
        _run_as(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
                       "-w", "-t", "60", "start"])
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode()} {log}")
    try:
        yield PgServer("127.0.0.1", port)
    finally:
        _run_as(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path) -> str:
    """A URL of an empty registry: a SQLite file in ``tmp_path``, or a fresh database on the test server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.url(server.create_database())
