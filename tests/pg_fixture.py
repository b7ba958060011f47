"""pytest plugin: a PostgreSQL server, a schema per test, admin helpers (test support).

Loaded from ``tests/conftest.py`` (``pytest_plugins``). Fixtures:

* ``postgres_dsn`` (session): ``TRIO_CLUSTER_TEST_DSN`` if set; else the server
  on ``127.0.0.1:5432`` (database ``test``) if it answers; else a throwaway
  cluster started from the system PostgreSQL binaries (`throwaway_cluster`),
  stopped and deleted at the end of the session. If none works the tests fail
  loudly with the reasons: a PostgreSQL test is never skipped silently.
* ``pg_schema``: a fresh schema ``test_<hex>`` per test, dropped (cascade)
  afterwards. Its ``dsn`` sets ``search_path`` to the schema, so unqualified
  table names stay private to the test.
* ``pg_admin``: synchronous SQL on an independent connection (sync psycopg),
  e.g. to terminate a backend in fault tests.
* ``private_server`` (module): a throwaway server of the test module's own,
  which its tests may stop and start again (`ThrowawayServer.stop`/``start``,
  e.g. to restart the database under a running runner). Started from the
  system binaries whatever ``TRIO_CLUSTER_TEST_DSN`` says; if that is
  impossible the test fails with the reason.

Mark PostgreSQL tests with ``pytest.mark.postgres``.

Shared by the PostgreSQL tests: `LEASE` and `TIMEOUT`, `unique_prefix` (the
table prefix also names the NOTIFY channel and the advisory-lock namespace,
which are database-wide, so each test needs its own), and `pg_messages` /
`pg_runners`, a session's PostgreSQL halves.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from trio_cluster.abc import StorageSession
    from trio_cluster.storage._postgres._driver._driver import PgConnection
    from trio_cluster.storage._postgres._messages import PgMessages
    from trio_cluster.storage._postgres._runners import PgRunners

LEASE = 2.0
"""Lease of the storage sessions of PostgreSQL tests, in seconds (real time).

Each lock operation gets a third of it: with 1 s, a 300-shard release took
longer than its 0.33 s on a machine running two test suites at once."""
TIMEOUT = 20
"""Guard of one PostgreSQL test (``trio.fail_after``), in seconds."""

ENV_DSN = "TRIO_CLUSTER_TEST_DSN"
DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
_PROBE_TIMEOUT = 2  # seconds (libpq's connect_timeout is whole seconds)


def unique_prefix() -> str:
    """A fresh table prefix, so concurrent tests never share a cluster."""
    return f"tc_{uuid.uuid4().hex[:12]}"


async def wait_blocked(
    watcher: PgConnection,
    application_name: str,
    done: Callable[[], bool] = lambda: False,
) -> None:
    """Wait until a session named ``application_name`` waits for a lock (or
    ``done()``, for a write that did not wait), polling ``pg_stat_activity``
    on ``watcher`` (a connection outside any transaction)."""
    while not done():
        rows = (
            await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND wait_event_type = 'Lock'",
                [application_name],
            )
        ).rows
        if rows[0][0]:
            return
        await trio.sleep(0.005)


def pg_messages(session: StorageSession) -> PgMessages:
    """The `PgMessages` of a `PostgresStorage` session."""
    from trio_cluster.storage._postgres._messages import PgMessages

    assert isinstance(session.messages, PgMessages)
    return session.messages


def pg_runners(session: StorageSession) -> PgRunners:
    """The `PgRunners` of a `PostgresStorage` session."""
    from trio_cluster.storage._postgres._runners import PgRunners

    assert isinstance(session.runners, PgRunners)
    return session.runners


def probe(dsn: str) -> str | None:
    """Connect to ``dsn`` and run ``select 1``; return why that failed, or None."""
    try:
        with psycopg.connect(
            dsn, connect_timeout=_PROBE_TIMEOUT, autocommit=True
        ) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


def pg_bin_dir() -> Path:
    """``PG_BIN`` if set, else the newest ``/usr/lib/postgresql/<major>/bin``."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else -1,
    )
    if not found:
        raise FileNotFoundError(
            "no PostgreSQL binaries in /usr/lib/postgresql/*/bin; set PG_BIN"
        )
    return found[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class ThrowawayServer:
    """A private PostgreSQL server started by `throwaway_server`, which a
    test may stop and start again (e.g. to simulate a database restart)."""

    dsn: str
    """Where to connect (``user=postgres dbname=postgres``)."""
    bin_dir: Path
    base: Path
    """Holds the data directory, the socket and the server log."""
    port: int
    run_as: str | None
    """The system user running the server (``postgres`` when we are root)."""

    def _run(self, *args: str | Path, check: bool = True) -> None:
        command = [str(arg) for arg in args]
        done = subprocess.run(command, user=self.run_as, capture_output=True, text=True)
        if check and done.returncode:
            raise subprocess.CalledProcessError(
                done.returncode, command, done.stdout, f"{done.stderr}"
            )

    def start(self) -> None:
        """Start the server (``pg_ctl start``) and wait until it accepts."""
        settings = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 {settings}"
        )
        self._run(
            self.bin_dir / "pg_ctl",
            "-D",
            self.base / "data",
            "-l",
            self.base / "log",
            "-w",
            "-o",
            options,
            "start",
        )

    @property
    def running(self) -> bool:
        """Whether the server is up (``pg_ctl status``)."""
        command = [
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.base / "data"),
            "status",
        ]
        done = subprocess.run(command, user=self.run_as, capture_output=True)
        return done.returncode == 0

    def stop(self, mode: str = "fast", *, check: bool = True) -> None:
        """Stop the server (``pg_ctl stop -m <mode>``) and wait until it is down."""
        self._run(
            self.bin_dir / "pg_ctl",
            "-D",
            self.base / "data",
            "-m",
            mode,
            "-w",
            "stop",
            check=check,
        )


@contextlib.contextmanager
def throwaway_server(bin_dir: Path | None = None) -> Iterator[ThrowawayServer]:
    """Start a temporary PostgreSQL cluster; yield it; stop and delete it.

    ``initdb`` and ``postgres`` refuse to run as root, so as root they run as
    the ``postgres`` system user (created by Debian's postgresql-common). The
    cluster listens on 127.0.0.1 on a free port, with fsync off (test data).

    Raises:
        subprocess.CalledProcessError: initdb or pg_ctl failed (the error has
            their output).
        KeyError: running as root and there is no ``postgres`` user.
    """
    bin_dir = bin_dir or pg_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="trio-cluster-pg-"))
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        user = pwd.getpwnam(run_as)
        os.chown(base, user.pw_uid, user.pw_gid)
    port = _free_port()
    server = ThrowawayServer(
        dsn=f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable",
        bin_dir=bin_dir,
        base=base,
        port=port,
        run_as=run_as,
    )
    started = False
    try:
        server._run(
            bin_dir / "initdb",
            "-D",
            base / "data",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        started = True  # pg_ctl may have started the server even if it fails
        server.start()
        yield server
    finally:
        if started:
            server.stop("immediate", check=False)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def throwaway_cluster(bin_dir: Path | None = None) -> Iterator[str]:
    """`throwaway_server`, yielding only its DSN."""
    with throwaway_server(bin_dir) as server:
        yield server.dsn


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The DSN of a PostgreSQL server for this test session (see module docstring)."""
    if env_dsn := os.environ.get(ENV_DSN):
        if problem := probe(env_dsn):
            pytest.fail(
                f"{ENV_DSN} is set but its server fails: {problem}", pytrace=False
            )
        yield env_dsn
        return
    if (local_problem := probe(DEFAULT_DSN)) is None:
        yield DEFAULT_DSN
        return
    with contextlib.ExitStack() as stack:
        failure = None
        try:
            dsn = stack.enter_context(throwaway_cluster())
        except (OSError, KeyError, subprocess.CalledProcessError) as exc:
            output = getattr(exc, "stderr", "") or ""
            failure = f"{type(exc).__name__}: {exc} {output}".strip()
        if failure is not None:
            pytest.fail(
                "no PostgreSQL for the tests:\n"
                f"- {ENV_DSN} is not set\n"
                f"- {DEFAULT_DSN!r} does not answer: {local_problem}\n"
                f"- starting a throwaway cluster failed: {failure}",
                pytrace=False,
            )
        yield dsn


@pytest.fixture(scope="module")
def private_server() -> Iterator[ThrowawayServer]:
    """A throwaway server for one test module (see the module docstring).

    A test that stops it must start it again (``finally``); the fixture
    restarts it anyway if a test left it down."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_server())
        except (OSError, KeyError, subprocess.CalledProcessError) as exc:
            output = getattr(exc, "stderr", "") or ""
            pytest.fail(
                f"cannot start a private PostgreSQL server: {type(exc).__name__}:"
                f" {exc} {output}".strip(),
                pytrace=False,
            )
        yield server


@pytest.fixture
def private_dsn(private_server: ThrowawayServer) -> str:
    """The DSN of ``private_server``, started again if a test left it down."""
    if not private_server.running:
        private_server.start()
    return private_server.dsn


def dsn_with_options(dsn: str, options: str) -> str:
    """``dsn`` with ``options`` appended to its libpq ``options`` parameter."""
    params = conninfo_to_dict(dsn)
    existing = str(params.get("options") or "")
    params["options"] = f"{existing} {options}".strip()
    return make_conninfo("", **params)


@attrs.frozen
class PgSchema:
    """A schema private to one test."""

    base_dsn: str
    """The session's DSN (``search_path`` not set)."""
    name: str
    """The schema name, ``test_<hex>``."""

    @property
    def dsn(self) -> str:
        """A DSN whose sessions use the schema as ``search_path``."""
        return dsn_with_options(self.base_dsn, f"-csearch_path={self.name}")

    def qualified(self, table: str) -> str:
        """``table`` qualified with the schema."""
        return f'"{self.name}"."{table}"'


@attrs.frozen
class PgAdmin:
    """Synchronous SQL on short-lived autocommit connections (sync psycopg)."""

    dsn: str
    """Where to connect."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``%s`` placeholders); return its rows, if any."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []

    def backends(self, application_name: str) -> list[int]:
        """Backend pids of the sessions with this ``application_name``."""
        rows = self.execute(
            "select pid from pg_stat_activity where application_name = %s order by pid",
            [application_name],
        )
        return [int(row[0]) for row in rows]

    def terminate(
        self, *, application_name: str | None = None, pid: int | None = None
    ) -> int:
        """``pg_terminate_backend`` the matching sessions, waiting up to 2 s for
        each to exit; return how many were terminated."""
        rows = self.execute(
            "select pg_terminate_backend(pid, 2000) from pg_stat_activity"
            " where (application_name = %s or pid = %s) and pid <> pg_backend_pid()",
            [application_name, pid],
        )
        return sum(1 for (done,) in rows if done)


@pytest.fixture(scope="session")
def pg_admin(postgres_dsn: str) -> PgAdmin:
    """Synchronous admin SQL on the session's server."""
    return PgAdmin(postgres_dsn)


@pytest.fixture
def pg_schema(postgres_dsn: str, pg_admin: PgAdmin) -> Iterator[PgSchema]:
    """A fresh schema for one test, dropped (cascade) afterwards."""
    schema = PgSchema(postgres_dsn, f"test_{uuid.uuid4().hex}")
    pg_admin.execute(f'CREATE SCHEMA "{schema.name}"')
    try:
        yield schema
    finally:
        # A test that left a session holding locks in the schema must not hang
        # the run: give up loudly after a few seconds.
        pg_admin.execute(
            f"SET lock_timeout = '5s'; DROP SCHEMA \"{schema.name}\" CASCADE"
        )
