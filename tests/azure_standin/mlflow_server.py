"""A real MLflow tracking server behind the workspace tracking URI.

Azure ML serves MLflow at https://<region>.api.azureml.ms/mlflow/v2.0/<workspace ARM path>, behind the workspace's
bearer-token check. The server here listens on plain http on loopback with that path as --static-prefix; clients
never reach it directly: the TLS stand-in serves /mlflow/v2.0/... after checking the token and forwards to it
(routes_mlflow.py), so both plain mlflow (https form + MLFLOW_TRACKING_TOKEN) and azureml-mlflow (azureml:// form,
rewritten to https) go through the same authenticated endpoint."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from .azurite import free_port, wait_port


class MlflowServer:
    def __init__(self, folder: Path, prefix: str, cert: Path, key: Path, port: int | None = None):
        self.folder = folder
        self.prefix = "/" + prefix.strip("/")
        self.cert, self.key = cert, key
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "mlflow-server.log"

    @property
    def uri(self) -> str:
        """The server's own address (no auth): for the stand-in's proxy and its own run bookkeeping only."""
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
            "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--default-artifact-root", str(self.folder / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--static-prefix", self.prefix,
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(self.port, self.proc, "mlflow server", timeout=120)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self.proc = None
