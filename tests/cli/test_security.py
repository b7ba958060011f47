"""The security options of ``trio-cluster run``
(`trio_cluster._cli._security`): where cluster secrets come from, and how
the TLS options and variables combine."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

import pytest

from trio_cluster import ConfigError
from trio_cluster._cli._security import (
    ENV_VARIABLES,
    load_cluster_secrets,
    transport_security,
)
from trio_cluster._core._config import ShardingConfig

if TYPE_CHECKING:
    from pathlib import Path

A = "a" * 32
B = "b" * 40
LOG = "trio_cluster.cli"


def secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "secrets"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


# ----------------------------------------------------------------------
# Cluster secrets


def test_no_secret_configured_is_none():
    assert load_cluster_secrets({}, None) == ()
    assert load_cluster_secrets({"TRIO_CLUSTER_SHARDS_PER_GROUP": "3"}, None) == ()


def test_a_file_lists_every_secret_in_order(tmp_path, caplog):
    text = f"# current\n{A}\n\n   \n  # next one\n  {B}  \r\n"
    path = secret_file(tmp_path, text)
    with caplog.at_level(logging.INFO, logger=LOG):
        assert load_cluster_secrets({}, path) == (A.encode(), B.encode())
    # How many and where from are logged; the secrets never are.
    assert "2 cluster secret(s)" in caplog.text
    assert A not in caplog.text
    assert B not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_secrets_are_utf8_bytes(tmp_path):
    path = secret_file(tmp_path, "clé-secrète-très-longue\n")
    assert load_cluster_secrets({}, path) == ("clé-secrète-très-longue".encode(),)


def test_the_file_variable_is_read_like_the_option(tmp_path):
    path = secret_file(tmp_path, f"{A}\n")
    assert load_cluster_secrets({"TRIO_CLUSTER_SECRET_FILE": path}, None) == (
        A.encode(),
    )


def test_the_option_wins_over_the_file_variable(tmp_path):
    path = secret_file(tmp_path, f"{A}\n")
    environ = {"TRIO_CLUSTER_SECRET_FILE": str(tmp_path / "elsewhere")}
    assert load_cluster_secrets(environ, path) == (A.encode(),)


def test_the_variable_holds_secrets_separated_by_whitespace():
    environ = {"TRIO_CLUSTER_SECRET": f" {A}\n\t{B} "}
    assert load_cluster_secrets(environ, None) == (A.encode(), B.encode())


@pytest.mark.parametrize("from_option", [True, False])
def test_a_file_and_the_secret_variable_are_refused(tmp_path, from_option):
    path = secret_file(tmp_path, f"{A}\n")
    environ = {"TRIO_CLUSTER_SECRET": B}
    if not from_option:
        environ["TRIO_CLUSTER_SECRET_FILE"] = path
    with pytest.raises(ConfigError, match="TRIO_CLUSTER_SECRET are both given"):
        load_cluster_secrets(environ, path if from_option else None)


@pytest.mark.parametrize(
    ("option", "variable", "says"),
    [
        ("missing", None, "--secret-file {path}: cannot read it"),
        (None, "missing", "TRIO_CLUSTER_SECRET_FILE={path}: cannot read it"),
        ("directory", None, "--secret-file {path}: cannot read it"),
        ("latin1", None, "--secret-file {path}: not UTF-8 text"),
        ("comments", None, "--secret-file {path} holds no secret"),
    ],
)
def test_an_unusable_file_is_refused_naming_it(tmp_path, option, variable, says):
    paths = {
        "missing": str(tmp_path / "missing"),
        "directory": str(tmp_path),
        "latin1": str(tmp_path / "latin1"),
        "comments": secret_file(tmp_path, "# nothing yet\n\n"),
    }
    (tmp_path / "latin1").write_bytes("clé\n".encode("latin-1"))
    path = paths[option or variable]
    environ = {} if variable is None else {"TRIO_CLUSTER_SECRET_FILE": path}
    with pytest.raises(ConfigError) as caught:
        load_cluster_secrets(environ, None if option is None else path)
    assert str(caught.value).startswith(says.format(path=path)), caught.value
    assert "\n" not in str(caught.value)


def test_an_empty_secret_variable_is_refused():
    with pytest.raises(ConfigError, match="TRIO_CLUSTER_SECRET holds no secret"):
        load_cluster_secrets({"TRIO_CLUSTER_SECRET": "  "}, None)


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o640, True), (0o604, True)])  # fmt: skip
def test_a_file_others_may_read_is_a_warning(tmp_path, caplog, mode, warned):
    path = secret_file(tmp_path, f"{A}\n", mode)
    with caplog.at_level(logging.INFO, logger=LOG):
        assert load_cluster_secrets({}, path) == (A.encode(),)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert warnings == [
            f"secret file {path} can be read by group or others"
            f" (mode {mode:03o}); chmod 600 it"
        ]
    else:
        assert warnings == []


# ----------------------------------------------------------------------
# Transport options


def test_nothing_configured_passes_nothing():
    assert transport_security({}) == {}


def test_secrets_and_allow_unauthenticated_are_passed(tmp_path):
    path = secret_file(tmp_path, f"{A}\n{B}\n")
    assert transport_security({}, secret_file=path, allow_unauthenticated=True) == {
        "cluster_secrets": (A.encode(), B.encode()),
        "allow_unauthenticated": True,
    }


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_options_build_the_contexts(pki, mutual):
    options = transport_security(
        {}, tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, tls_mutual=mutual
    )
    server, client = (
        options.pop("server_ssl_context"),
        options.pop("client_ssl_context"),
    )
    assert options == {}
    assert server.verify_mode == (ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE)
    assert client.check_hostname
    assert len(client.get_ca_certs()) == 1


def test_tls_variables_are_read_and_options_win(pki, other_pki):
    environ = {
        "TRIO_CLUSTER_TLS_CERT": pki.cert,
        "TRIO_CLUSTER_TLS_KEY": pki.key,
        "TRIO_CLUSTER_TLS_CA": other_pki.ca,
    }
    options = transport_security(environ, tls_mutual=True)
    [ca] = options["server_ssl_context"].get_ca_certs()
    assert ca["subject"] == ((("commonName", "another CA"),),)
    assert options["server_ssl_context"].verify_mode == ssl.CERT_REQUIRED
    # The option's CA replaces the variable's: a junk file named by the
    # variable is not read.
    environ["TRIO_CLUSTER_TLS_CA"] = "/nonexistent/ca.pem"
    options = transport_security(environ, tls_ca=pki.ca, tls_mutual=True)
    [ca] = options["client_ssl_context"].get_ca_certs()
    assert ca["subject"] == ((("commonName", "trio-cluster test CA"),),)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"tls_cert": "cert"}, "give both --tls-cert and --tls-key"),
        ({"tls_key": "key"}, "give both --tls-cert and --tls-key"),
        ({"tls_ca": "ca"}, "--tls-ca needs --tls-cert and --tls-key"),
        ({"tls_mutual": True}, "--tls-mutual needs --tls-cert and --tls-key"),
        (
            {"tls_cert": "cert", "tls_key": "key", "tls_mutual": True},
            "--tls-mutual needs --tls-ca",
        ),
        (
            {"tls_cert": "cert", "tls_key": "missing"},
            "TLS file '{missing}' cannot be read",
        ),
    ],
)
def test_incomplete_or_bad_tls_options_are_refused(pki, tmp_path, given, says):
    files = {
        "cert": pki.cert,
        "key": pki.key,
        "ca": pki.ca,
        "missing": str(tmp_path / "missing"),
    }
    options = {k: files[v] if isinstance(v, str) else v for k, v in given.items()}
    with pytest.raises(ConfigError) as caught:
        transport_security({}, **options)
    assert str(caught.value).startswith(says.format(missing=files["missing"]))


def test_the_variables_are_not_refused_as_unknown_config_fields():
    environ = dict.fromkeys(ENV_VARIABLES, "x")
    assert {
        "TRIO_CLUSTER_SECRET",
        "TRIO_CLUSTER_SECRET_FILE",
        "TRIO_CLUSTER_TLS_CERT",
        "TRIO_CLUSTER_TLS_KEY",
        "TRIO_CLUSTER_TLS_CA",
    } == ENV_VARIABLES
    with pytest.raises(ConfigError, match="unknown variable"):
        ShardingConfig.from_env(environ)
    ShardingConfig.from_env(environ, ignore=ENV_VARIABLES)
