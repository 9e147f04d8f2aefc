"""Azurite (npm `azurite`, pinned by infra/install-azurite.sh) as the workspace and registry blob store, plus
the few blob helpers the stand-in needs (upload a folder, download a prefix, SAS URLs).

Azurite is always started with --disableTelemetry: without it, it tries to reach an outside host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContainerSasPermissions,
    generate_blob_sas,
    generate_container_sas,
)

ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_azurite() -> str:
    """The azurite-blob launcher: $AZURITE_BIN, the project-local install, or PATH."""
    env = os.environ.get("AZURITE_BIN")
    candidates = [env] if env else []
    local = REPO_ROOT / ".cache" / "azurite" / "node_modules" / ".bin"
    candidates += [str(local / "azurite-blob"), shutil.which("azurite-blob") or ""]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise RuntimeError("azurite not found: run `bash infra/install-azurite.sh` (or set AZURITE_BIN)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


class Azurite:
    """One azurite-blob process on 127.0.0.1:port with TLS; its data lives under `folder`."""

    def __init__(self, folder: Path, cert: Path, key: Path, ca_bundle: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.cert, self.key, self.ca_bundle = cert, key, ca_bundle
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "azurite.log"

    @property
    def storage_endpoint(self) -> str:
        """What the SDK's cloud metadata calls storage_endpoint: account URL = https://{acct}.blob.{this}."""
        return f"core.localhost:{self.port}"

    @property
    def account_url(self) -> str:
        return f"https://{ACCOUNT}.blob.{self.storage_endpoint}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_azurite(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--location", str(self.folder / "data"),
            "--cert", str(self.cert),
            "--key", str(self.key),
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, self.proc, "azurite")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    # ---- blob helpers -------------------------------------------------------------------------------
    def service(self) -> BlobServiceClient:
        return BlobServiceClient(self.account_url, credential=ACCOUNT_KEY, connection_verify=str(self.ca_bundle))

    def ensure_container(self, name: str) -> None:
        cc = self.service().get_container_client(name)
        if not cc.exists():
            cc.create_container()

    def upload_folder(self, src: Path, container: str, prefix: str) -> int:
        """Upload a local file or folder to container/prefix/...; returns the number of files."""
        self.ensure_container(container)
        cc = self.service().get_container_client(container)
        src = Path(src)
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        prefix = prefix.strip("/")
        for f in files:
            rel = f.name if src.is_file() else f.relative_to(src).as_posix()
            with open(f, "rb") as fh:
                cc.upload_blob(f"{prefix}/{rel}" if prefix else rel, fh, overwrite=True)
        return len(files)

    def upload_bytes(self, container: str, blob: str, data: bytes) -> None:
        self.ensure_container(container)
        self.service().get_blob_client(container, blob).upload_blob(data, overwrite=True)

    def download_prefix(self, container: str, prefix: str, dest: Path) -> int:
        """Download every blob under container/prefix into dest (keeping the relative layout). A prefix that
        names one blob downloads that blob as dest/<name>. Returns the number of files."""
        cc = self.service().get_container_client(container)
        prefix = prefix.lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        folder_prefix = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
        for b in cc.list_blobs(name_starts_with=prefix):
            if b.name == prefix:
                rel = prefix.rsplit("/", 1)[-1]
            elif b.name.startswith(folder_prefix):
                rel = b.name[len(folder_prefix) :]
            else:
                continue  # a sibling that only shares the name's start (e.g. "out" vs "output")
            if not rel or rel.endswith("/"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                cc.download_blob(b.name).readinto(fh)
            n += 1
        return n

    def download_bytes(self, container: str, blob: str) -> bytes:
        return self.service().get_blob_client(container, blob).download_blob().readall()

    def blob_exists(self, container: str, blob: str) -> bool:
        return self.service().get_blob_client(container, blob).exists()

    def container_sas_url(self, container: str, hours: int = 24, write: bool = True) -> str:
        perm = ContainerSasPermissions(read=True, write=write, create=write, add=write, list=True, delete=write)
        sas = generate_container_sas(
            ACCOUNT, container, account_key=ACCOUNT_KEY, permission=perm, expiry=_expiry(hours)
        )
        return f"{self.account_url}/{container}?{sas}"

    def blob_sas_url(self, container: str, blob: str, hours: int = 24) -> str:
        sas = generate_blob_sas(
            ACCOUNT, container, blob, account_key=ACCOUNT_KEY, permission=BlobSasPermissions(read=True),
            expiry=_expiry(hours),
        )  # fmt: skip
        return f"{self.account_url}/{container}/{blob}?{sas}"


def _expiry(hours: int) -> datetime:
    return datetime.now(timezone.utc) + timedelta(hours=hours)
