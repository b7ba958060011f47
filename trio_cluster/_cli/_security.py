"""The security options of ``trio-cluster run``: cluster secrets and TLS
(command-line edge).

Turns the options and ``TRIO_CLUSTER_*`` variables below into keyword
arguments of `WebSocketTransport`:

* cluster secrets, never taken from the command line (it is visible to every
  user of the machine): ``--secret-file PATH`` or
  ``TRIO_CLUSTER_SECRET_FILE`` (one secret per line; blank lines and lines
  starting with ``#`` are ignored), or ``TRIO_CLUSTER_SECRET`` (secrets
  separated by whitespace). Every secret listed is accepted from peers and
  proven to them, which is how a secret is rotated;
* ``--allow-unauthenticated``;
* TLS: ``--tls-cert``, ``--tls-key``, ``--tls-ca`` (or
  ``TRIO_CLUSTER_TLS_CERT``, ``_KEY``, ``_CA``; the options win) and
  ``--tls-mutual``, built with `tls_contexts`.

Every mistake is a `ConfigError` whose one-line message names the option,
variable or file.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from ..transport._tls import tls_contexts

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ENV_VARIABLES", "load_cluster_secrets", "transport_security"]

log = logging.getLogger("trio_cluster.cli")

SECRET = "TRIO_CLUSTER_SECRET"
SECRET_FILE = "TRIO_CLUSTER_SECRET_FILE"
TLS_CERT = "TRIO_CLUSTER_TLS_CERT"
TLS_KEY = "TRIO_CLUSTER_TLS_KEY"
TLS_CA = "TRIO_CLUSTER_TLS_CA"
ENV_VARIABLES = frozenset({SECRET, SECRET_FILE, TLS_CERT, TLS_KEY, TLS_CA})
"""The variables read here (not `ShardingConfig` fields)."""


def load_cluster_secrets(
    environ: Mapping[str, str], secret_file: str | None
) -> tuple[bytes, ...]:
    """The cluster secrets (UTF-8 encoded), in the order given; empty if
    none is configured.

    From ``secret_file`` (the ``--secret-file`` option), else the file named
    by ``TRIO_CLUSTER_SECRET_FILE``, else ``TRIO_CLUSTER_SECRET``. A secret
    file that group or others may access is logged as a warning. The
    secrets' length and count are checked by the transport.

    Args:
        environ: usually ``os.environ``.
        secret_file: the ``--secret-file`` option, or None.

    Raises:
        ConfigError: a file and ``TRIO_CLUSTER_SECRET`` both given; a file
            that cannot be read or is not UTF-8; a file or variable that
            holds no secret.
    """
    if secret_file is not None:
        source = f"--secret-file {secret_file}"
    elif SECRET_FILE in environ:
        secret_file = environ[SECRET_FILE]
        source = f"{SECRET_FILE}={secret_file}"
    else:
        source = SECRET
    if secret_file is not None and SECRET in environ:
        raise ConfigError(
            f"{source} and {SECRET} are both given; use one (a file is safer)"
        )
    if secret_file is not None:
        secrets = _read_secret_file(secret_file, source)
    elif SECRET in environ:
        secrets = environ[SECRET].split()
    else:
        return ()
    if not secrets:
        raise ConfigError(f"{source} holds no secret")
    log.info("%d cluster secret(s) from %s", len(secrets), source)
    return tuple(secret.encode() for secret in secrets)


def _read_secret_file(path: str, source: str) -> list[str]:
    """The secrets listed in the file at ``path``.

    Raises:
        ConfigError: it cannot be read or is not UTF-8 text.
    """
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    if mode & 0o077:
        log.warning(
            "secret file %s can be read by group or others (mode %03o); chmod 600 it",
            path,
            mode & 0o777,
        )
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def transport_security(
    environ: Mapping[str, str],
    *,
    secret_file: str | None = None,
    allow_unauthenticated: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    tls_mutual: bool = False,
) -> dict[str, Any]:
    """`WebSocketTransport` keyword arguments for these options and
    variables: the TLS contexts, ``cluster_secrets`` and
    ``allow_unauthenticated`` (each only if configured).

    Args:
        environ: usually ``os.environ``.
        secret_file, allow_unauthenticated, tls_cert, tls_key, tls_ca,
            tls_mutual: the options of the same names (None or False:
            not given).

    Raises:
        ConfigError: see `load_cluster_secrets` and `tls_contexts`; only one
            of the certificate and the key; ``--tls-ca`` or ``--tls-mutual``
            without them; ``--tls-mutual`` without ``--tls-ca``.
    """
    options: dict[str, Any] = {}
    secrets = load_cluster_secrets(environ, secret_file)
    if secrets:
        options["cluster_secrets"] = secrets
    if allow_unauthenticated:
        options["allow_unauthenticated"] = True
    cert = _option_or_variable(tls_cert, environ, TLS_CERT)
    key = _option_or_variable(tls_key, environ, TLS_KEY)
    ca = _option_or_variable(tls_ca, environ, TLS_CA)
    if (cert is None) != (key is None):
        raise ConfigError(
            "give both --tls-cert and --tls-key (or"
            f" {TLS_CERT} and {TLS_KEY}) to use TLS, or neither"
        )
    if cert is None or key is None:
        if ca is not None or tls_mutual:
            raise ConfigError(
                f"{'--tls-mutual' if tls_mutual else '--tls-ca'} needs"
                " --tls-cert and --tls-key"
            )
        return options
    if tls_mutual and ca is None:
        raise ConfigError(
            "--tls-mutual needs --tls-ca, the authority that signs the"
            " runners' certificates"
        )
    server, client = tls_contexts(cert, key, ca_file=ca, mutual=tls_mutual)
    options["server_ssl_context"] = server
    options["client_ssl_context"] = client
    return options


def _option_or_variable(
    option: str | None, environ: Mapping[str, str], variable: str
) -> str | None:
    """The option if given, else the variable if set and not empty."""
    if option is not None:
        return option
    return environ.get(variable) or None
