"""`tls_contexts`: the TLS contexts of a runner, from PEM files (edge adapter).

`WebSocketTransport` takes a server context (for connections it accepts)
and a client context (for connections it dials). This module builds the
pair every runner of a cluster needs from the usual files: the runner's
certificate chain and key, and the certificate authority its peers'
certificates are checked against. Reading the files is the only I/O here;
every problem with them is a `ConfigError` naming the file.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import NoReturn

from .._errors import ConfigError

__all__ = ["tls_contexts"]


def tls_contexts(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    ca_file: str | os.PathLike[str] | None = None,
    mutual: bool = False,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The server and client TLS contexts of one runner of a cluster.

    Pass them to `WebSocketTransport` as ``server_ssl_context`` and
    ``client_ssl_context``. Both require TLS 1.2 or later.

    * The server context presents this runner's certificate chain. With
      ``mutual``, it also requires a client certificate from every peer that
      connects, verified against ``ca_file`` (and only it: the system's
      trust store is not consulted for client certificates).
    * The client context verifies the certificate of each peer it dials
      against ``ca_file`` (the system's trust store if None), including its
      host name: peers are dialed at the address they advertise, so each
      runner's certificate must name that host name or IP address in its
      subjectAltName. It presents this runner's certificate chain when the
      peer asks for one, so that the same files serve under mutual TLS.

    Args:
        cert_file: PEM file with this runner's certificate, followed by any
            intermediate certificates.
        key_file: PEM file with the certificate's private key, unencrypted
            (a runner cannot type a password).
        ca_file: PEM file with the certificate(s) of the authority that signs
            the runners' certificates; None: the system's trust store.
        mutual: require and verify client certificates (mutual TLS); needs
            ``ca_file``.

    Returns:
        ``(server_context, client_context)``.

    Raises:
        ConfigError: ``mutual`` without ``ca_file``; a file that cannot be
            read or holds no valid certificate or key; a key that does not
            match the certificate or is encrypted. The message names the file.
    """
    if mutual and ca_file is None:
        raise ConfigError(
            "mutual TLS needs the certificate authority that signs client"
            " certificates (ca_file)"
        )
    cert_file, key_file = os.fspath(cert_file), os.fspath(key_file)
    ca_file = None if ca_file is None else os.fspath(ca_file)
    for path in (cert_file, key_file, *([ca_file] if ca_file else [])):
        _check_readable(path)
    _check_certificates(cert_file, "certificate file")
    if ca_file is not None:
        _check_certificates(ca_file, "CA file")

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peer and host
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(context, cert_file, key_file)
    if ca_file is None:
        client.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        client.load_verify_locations(cafile=ca_file)
        if mutual:
            server.load_verify_locations(cafile=ca_file)
            server.verify_mode = ssl.CERT_REQUIRED
    return server, client


def _check_readable(path: str) -> None:
    """Raises: ConfigError: ``path`` cannot be read."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(
            f"TLS file {path!r} cannot be read: {exc.strerror or exc}"
        ) from None


def _check_certificates(path: str, what: str) -> None:
    """Raises: ConfigError: ``path`` holds no valid PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS {what} {path!r} holds no valid PEM certificate: {_reason(exc)}"
        ) from None


class _EncryptedKeyError(Exception):
    """Raised by the password callback: the key wants a password."""


def _no_password() -> NoReturn:
    raise _EncryptedKeyError


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load this runner's chain into ``context`` (the certificate file has
    been checked already, so a failure here is the key's).

    Raises:
        ConfigError: the key is invalid, encrypted, or not the certificate's.
    """
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKeyError:
        raise ConfigError(
            f"TLS key file {key_file!r} is encrypted; give an unencrypted key"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS key file {key_file!r} is not a valid private key for"
            f" {cert_file!r}: {_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason, on one line (``exc`` itself if it has none)."""
    reason = getattr(exc, "reason", None) or re.sub(r"\(_ssl\.c:\d+\)", "", str(exc))
    return " ".join(str(reason).split())
