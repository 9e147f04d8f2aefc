"""Certificates for the stand-in: one local CA (trustme) signs one server certificate for 127.0.0.1, localhost
and the production-style blob host names (`*.blob.core.localhost`). Clients trust it through a bundle that is
certifi's roots plus this CA, so REQUESTS_CA_BUNDLE / SSL_CERT_FILE can point at it without breaking anything."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("127.0.0.1", "localhost", "*.localhost", "*.blob.core.localhost", "*.vault.localhost")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # the stand-in's CA alone
    ca_bundle: Path  # certifi roots + the CA: what REQUESTS_CA_BUNDLE / SSL_CERT_FILE point at
    cert: Path  # server certificate chain (PEM)
    key: Path  # server private key (PEM)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def make_tls(folder: Path) -> TlsFiles:
    """Create (or reuse, when all files exist) the CA and server certificate under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "ca-bundle.pem", folder / "server.pem", folder / "server.key")
    if all(p.exists() for p in (files.ca_cert, files.ca_bundle, files.cert, files.key)):
        return files
    ca = trustme.CA(organization_name="orch local azure stand-in")
    leaf = ca.issue_cert(*SERVER_NAMES)
    ca.cert_pem.write_to_path(str(files.ca_cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    with open(files.cert, "wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    roots = b""
    try:
        import certifi

        roots = Path(certifi.where()).read_bytes()
    except ImportError:  # pragma: no cover - certifi comes with requests
        pass
    files.ca_bundle.write_bytes(roots + b"\n" + ca.cert_pem.bytes())
    return files
