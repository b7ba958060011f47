"""The ``trio-cluster`` command (`trio_cluster._cli._main`) and
``python -m trio_cluster``."""

from __future__ import annotations

import ssl
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


def test_run_refuses_to_listen_beyond_loopback_without_authentication(
    capsys, pg_schema
):
    got, err = run_cli(
        capsys,
        "--dsn",
        pg_schema.dsn,
        "--listen",
        "0.0.0.0:0",
        "--advertise",
        "127.0.0.1",
    )
    assert got == 2
    assert "not a loopback address" in err
    assert "TRIO_CLUSTER_SECRET" in err


def test_run_takes_no_abbreviated_options(capsys):
    # `--secret VALUE` must not pass for `--secret-file VALUE`: the secret
    # would be read as a path and shown in the error.
    with pytest.raises(SystemExit):
        main(["run", TARGET, "--dsn", "x", "--listen", "a:1", "--secret", "hunter2"])
    assert "unrecognized arguments: --secret hunter2" in capsys.readouterr().err


def test_advertise_is_the_address_peers_dial():
    from trio_cluster._cli._main import _advertised

    listen = "0.0.0.0:34431"
    assert str(_advertised(listen, "10.0.0.5")) == "10.0.0.5:34431"
    assert str(_advertised(listen, "10.0.0.5:40000")) == "10.0.0.5:40000"
    assert str(_advertised(listen, "fd00::5")) == "[fd00::5]:34431"
    assert str(_advertised(listen, "[fd00::5]:1")) == "[fd00::5]:1"
    assert str(_advertised("10.0.0.5:1", None)) == "10.0.0.5:1"


# ----------------------------------------------------------------------
# Security options: cluster secrets and TLS

NO_DATABASE = ("--dsn", "host=127.0.0.1 port=1 dbname=test", "--listen", "127.0.0.1:0")
"""Options of a runner whose database is never reached: a mistake in the
security options is reported (exit 2) before it would be (exit 1)."""


@pytest.fixture
def transport_options(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The keyword arguments ``run`` gives `WebSocketTransport`, which here
    records them and stops the command (exit 2, "stopped by the test")."""
    import trio_cluster.transport
    from trio_cluster import ConfigError

    seen: dict[str, object] = {}

    def recording(**options: object) -> None:
        seen.update(options)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(trio_cluster.transport, "WebSocketTransport", recording)
    for name in ("SECRET", "SECRET_FILE", "TLS_CERT", "TLS_KEY", "TLS_CA"):
        monkeypatch.delenv(f"TRIO_CLUSTER_{name}", raising=False)
    return seen


def test_run_passes_the_security_options_to_the_transport(
    capsys, tmp_path, pki, transport_options
):
    secrets = tmp_path / "secrets"
    secrets.write_text("a-first-secret-of-32-characters!\n")
    secrets.chmod(0o600)
    got, err = run_cli(
        capsys,
        *NO_DATABASE,
        "--secret-file",
        str(secrets),
        "--allow-unauthenticated",
        "--tls-cert",
        pki.cert,
        "--tls-key",
        pki.key,
        "--tls-ca",
        pki.ca,
        "--tls-mutual",
    )
    assert (got, err) == (2, "trio-cluster run: stopped by the test\n")
    server = transport_options.pop("server_ssl_context")
    client = transport_options.pop("client_ssl_context")
    assert transport_options == {
        "listen_at": None,
        "cluster_secrets": (b"a-first-secret-of-32-characters!",),
        "allow_unauthenticated": True,
    }
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED


def test_run_reads_the_security_variables(capsys, monkeypatch, pki, transport_options):
    monkeypatch.setenv(
        "TRIO_CLUSTER_SECRET", "secret-number-one-of-32-chars-ok second-secret"
    )
    monkeypatch.setenv("TRIO_CLUSTER_TLS_CERT", pki.cert)
    monkeypatch.setenv("TRIO_CLUSTER_TLS_KEY", pki.key)
    monkeypatch.setenv("TRIO_CLUSTER_TLS_CA", pki.ca)
    got, err = run_cli(capsys, *NO_DATABASE)
    assert (got, err) == (2, "trio-cluster run: stopped by the test\n")
    assert transport_options["cluster_secrets"] == (
        b"secret-number-one-of-32-chars-ok",
        b"second-secret",
    )
    server = transport_options["server_ssl_context"]
    assert isinstance(server, ssl.SSLContext)
    assert server.verify_mode == ssl.CERT_NONE
    assert "allow_unauthenticated" not in transport_options


def test_run_without_security_options_passes_none(capsys, transport_options):
    got, _ = run_cli(capsys, *NO_DATABASE)
    assert got == 2
    assert transport_options == {"listen_at": None}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tls-cert", "{cert}"], "give both --tls-cert and --tls-key"),
        (["--tls-key", "{key}"], "give both --tls-cert and --tls-key"),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-mutual"],
            "--tls-mutual needs --tls-ca",
        ),
        (["--tls-ca", "{ca}"], "--tls-ca needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", "{missing}", "--tls-key", "{key}"],
            "TLS file '{missing}' cannot be read",
        ),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-ca", "{key}"],
            "TLS CA file '{key}' holds no valid PEM certificate",
        ),
        (["--secret-file", "{missing}"], "--secret-file {missing}: cannot read it"),
    ],
)
def test_run_refuses_bad_security_options_in_one_line(
    capsys, tmp_path, pki, argv, says
):
    files = {
        "cert": pki.cert,
        "key": pki.key,
        "ca": pki.ca,
        "missing": str(tmp_path / "missing.pem"),
    }
    got, err = run_cli(capsys, *NO_DATABASE, *(arg.format(**files) for arg in argv))
    assert got == 2
    assert err.startswith(f"trio-cluster run: {says.format(**files)}"), err
    assert err.count("\n") == 1, err


def test_run_refuses_a_secret_file_with_the_secret_variable(
    capsys, monkeypatch, tmp_path
):
    secrets = tmp_path / "secrets"
    secrets.write_text("a-first-secret-of-32-characters!\n")
    monkeypatch.setenv("TRIO_CLUSTER_SECRET", "another-secret-of-32-characters!")
    got, err = run_cli(capsys, *NO_DATABASE, "--secret-file", str(secrets))
    assert got == 2
    assert "TRIO_CLUSTER_SECRET are both given" in err
    assert err.count("\n") == 1, err


def test_a_target_mapping_may_give_a_tracer_and_listeners(monkeypatch):
    import types

    from trio_cluster._cli._main import load_target

    tracer, listener = object(), object()
    module = types.ModuleType("target_with_tracer")
    module.RUNNER = {  # type: ignore[attr-defined]
        "entities": [],
        "tracer": tracer,
        "listeners": [listener],
    }
    monkeypatch.setitem(sys.modules, "target_with_tracer", module)
    options = load_target("target_with_tracer:RUNNER")
    assert options["tracer"] is tracer
    assert options["listeners"] == [listener]


def test_run_freezes_the_collector_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `trio-cluster run` owns its process: shorter full collections there.
    import argparse

    from trio_cluster._cli._main import _config

    args = argparse.Namespace(listen=None)
    monkeypatch.delenv("TRIO_CLUSTER_FREEZE_GC_AT_START", raising=False)
    assert _config(args).freeze_gc_at_start is True
    monkeypatch.setenv("TRIO_CLUSTER_FREEZE_GC_AT_START", "false")
    assert _config(args).freeze_gc_at_start is False
