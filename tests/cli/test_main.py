"""The ``trio-cluster`` command (`trio_cluster._cli._main`) and
``python -m trio_cluster``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_cluster._cli._main import main, main as cli_main


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli_main([])
    assert "demo" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_demo_runs():
    result = subprocess.run(
        [sys.executable, "-m", "trio_cluster", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "done." in result.stdout


def test_demo_command_with_runners(capsys):
    assert main(["demo", "--runners", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 runners" in out
    assert "failover" in out


# ----------------------------------------------------------------------
# Operator mistakes: one line and a documented exit status, no traceback
# (issue 12, item 9)

TARGET = "tests.helpers:ENTITIES_FOR_CLI"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", TARGET, *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no message"
    assert lines[0].startswith("trio-cluster run: "), err
    return code, err


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--listen", "nonsense"], 2, "--listen: not a runner address"),
        (["--listen", "127.0.0.1:0", "--metrics", "bad:port"], 2, "--metrics"),
        (["--listen", "127.0.0.1:0", "--prefix", "Bad Prefix!"], 2, "table_prefix"),
    ],
)
def test_run_refuses_bad_options_in_one_line(capsys, pg_schema, argv, code, says):
    got, err = run_cli(capsys, "--dsn", pg_schema.dsn, *argv)
    assert got == code
    assert says in err


def test_run_refuses_a_malformed_dsn_with_status_2(capsys):
    got, err = run_cli(
        capsys,
        "--dsn",
        "postgresql://app@127.0.0.1:notaport/x",
        "--listen",
        "127.0.0.1:0",
    )
    assert got == 2
    assert "port 'notaport'" in err


def test_migrate_refuses_a_malformed_dsn_with_status_2(capsys):
    assert main(["migrate", "--dsn", "postgresql://app@127.0.0.1:notaport/x"]) == 2
    assert "invalid PostgreSQL DSN" in capsys.readouterr().err


def test_run_with_the_database_down_says_so_in_one_line(capsys):
    got, err = run_cli(
        capsys, "--dsn", "host=127.0.0.1 port=1 dbname=test", "--listen", "127.0.0.1:0"
    )
    assert got == 1
    assert "127.0.0.1" in err


def test_run_on_a_port_in_use_says_so_in_one_line(capsys, pg_schema):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got, err = run_cli(
            capsys, "--dsn", pg_schema.dsn, "--listen", f"127.0.0.1:{port}"
        )
        assert got == 1
        assert "in use" in err
        got, err = run_cli(
            capsys,
            "--dsn",
            pg_schema.dsn,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            f"127.0.0.1:{port}",
        )
        assert got == 1
        assert f"--metrics 127.0.0.1:{port}" in err


def test_run_refuses_a_malformed_variable(capsys, pg_schema, monkeypatch):
    monkeypatch.setenv("TRIO_CLUSTER_LEASE_DURATION", "soon")
    got, err = run_cli(capsys, "--dsn", pg_schema.dsn, "--listen", "127.0.0.1:0")
    assert got == 2
    assert "TRIO_CLUSTER_LEASE_DURATION" in err


def test_an_unknown_log_level_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("TRIO_CLUSTER_LOG_LEVEL", "LOUD")
    assert main(["migrate", "--dsn", "host=127.0.0.1 port=1 dbname=test"]) == 2
    assert "TRIO_CLUSTER_LOG_LEVEL='LOUD' is not a log level" in capsys.readouterr().err


async def test_a_host_that_does_not_resolve_is_named(monkeypatch):
    import socket

    import trio

    from trio_cluster.storage._postgres._driver._connect import resolve_host

    async def nowhere(*args: object, **kwargs: object) -> object:
        await trio.lowlevel.checkpoint()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(trio.socket, "getaddrinfo", nowhere)
    with pytest.raises(socket.gaierror, match=r"'db\.example'"):
        await resolve_host({"host": "db.example"})


def test_run_refuses_to_advertise_a_listen_anywhere_address(capsys, pg_schema):
    # `--listen 0.0.0.0:PORT` was accepted and advertised to the other
    # runners, which then dialed 0.0.0.0 (issue 12, item 10).
    got, err = run_cli(capsys, "--dsn", pg_schema.dsn, "--listen", "0.0.0.0:0")
    assert got == 2
    assert "--advertise" in err


def test_advertise_is_the_address_peers_dial():
    from trio_cluster._cli._main import _advertised

    listen = "0.0.0.0:34431"
    assert str(_advertised(listen, "10.0.0.5")) == "10.0.0.5:34431"
    assert str(_advertised(listen, "10.0.0.5:40000")) == "10.0.0.5:40000"
    assert str(_advertised(listen, "fd00::5")) == "[fd00::5]:34431"
    assert str(_advertised(listen, "[fd00::5]:1")) == "[fd00::5]:1"
    assert str(_advertised("10.0.0.5:1", None)) == "10.0.0.5:1"
