"""Test certificates made with the openssl CLI: two CAs, server and client certificates (EC P-256, fast)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Pki:
    dir: Path
    ca: Path  # the trusted CA
    server_cert: Path  # signed by ca, for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path  # signed by ca, clientAuth
    client_key: Path
    other_ca: Path  # a second, unrelated CA
    other_server_cert: Path  # signed by other_ca (for reload tests)
    other_server_key: Path
    other_client_cert: Path  # signed by other_ca: refused by an mTLS server trusting ca
    other_client_key: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", d / f"{name}.key", "-out", d / f"{name}.pem")


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")


SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
CLIENT_EXT = "extendedKeyUsage=clientAuth"


def make_pki(d: Path) -> Pki:
    """Raises OSError or subprocess.SubprocessError when openssl is missing or fails."""
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", SERVER_EXT)
    _leaf(d, "client", "ca", CLIENT_EXT)
    _leaf(d, "other-server", "other-ca", SERVER_EXT)
    _leaf(d, "other-client", "other-ca", CLIENT_EXT)
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "other-ca.pem", d / "other-server.pem", d / "other-server.key", d / "other-client.pem",
               d / "other-client.key")
