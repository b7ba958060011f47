"""Certificates for the TLS tests, made with the ``openssl`` command (test
support).

`make_pki` makes a certificate authority and a runner certificate it signs
for ``IP:127.0.0.1`` (EC P-256 keys, valid for a day): the same steps
docs/operations.md gives operators. The session fixture ``pki`` is one
cluster's CA and runner certificate; ``other_pki`` is another, unrelated
authority's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import attrs
import pytest

__all__ = ["Pki", "make_pki", "other_pki", "pki"]


@attrs.frozen
class Pki:
    ca: str
    """The authority's certificate (PEM)."""
    cert: str
    """The runner certificate it signed, for ``IP:127.0.0.1``."""
    key: str
    """That certificate's private key."""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_pki(folder: Path, ca_name: str = "trio-cluster test CA") -> Pki:
    """A new CA (common name ``ca_name``) and a runner certificate it signs,
    in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "runner.pem", folder / "runner.key", folder / "runner.csr"
    ext = folder / "runner.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca),
        "-days", "1", "-subj", f"/CN={ca_name}",
    )  # fmt: skip
    _openssl(
        "req", *curve, "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=runner",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext),
    )  # fmt: skip
    return Pki(ca=str(ca), cert=str(cert), key=str(key))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"), "another CA")
