"""The TLS stand-in server and the `StandIn` object that starts everything (Azurite, MLflow, this server),
seeds it, and hands out settings and real SDK clients."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from . import openapi, routes_auth, routes_control, routes_keyvault, routes_mlflow, routes_runhistory
from . import state as st
from .azurite import ACCOUNT, Azurite, free_port
from .executor import Executor
from .mlflow_server import MlflowServer
from .tls import TlsFiles, make_tls
from .web import Ctx, HttpError, Response, Router, arm_error

CLOUD_NAME = "LocalCloud"
KEY_VAULT_NAME = "orchkv"
_HOOK = """# Written by the orch Azure stand-in: *.localhost -> 127.0.0.1 for this job's Python (as Azure DNS would
# resolve the vault and storage hosts). Only names ending in .localhost are touched.
import socket as _s

_orig = _s.getaddrinfo


def _gai(host, *a, **k):
    h = host.decode() if isinstance(host, bytes) else host
    if isinstance(h, str) and h.lower().rstrip(".").endswith(".localhost"):
        host = "127.0.0.1"
    return _orig(host, *a, **k)


_s.getaddrinfo = _gai
"""
SECRET_HEADERS = {"authorization", "x-ms-authorization-auxiliary", "secret", "x-identity-header"}


# ---- name resolution ------------------------------------------------------------------------------------
_orig_getaddrinfo = socket.getaddrinfo
_resolver_installed = False


def install_localhost_resolver() -> None:
    """Make every `*.localhost` name (devstoreaccount1.blob.core.localhost, ...) resolve to 127.0.0.1 in this
    process, so production-style storage URLs reach Azurite without editing /etc/hosts. Subprocesses (jobs)
    rely on /etc/hosts, which infra/install-azurite.sh edits when run as root."""
    global _resolver_installed
    if _resolver_installed:
        return

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, (str, bytes)):
            h = host.decode() if isinstance(host, bytes) else host
            if h.lower().rstrip(".").endswith(".localhost"):
                host = "127.0.0.1"
        return _orig_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    _resolver_installed = True


# ---- HTTP handler ----------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "orch-azure-standin/1"
    standin: StandIn  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        path = unquote(split.path)
        query: dict[str, str] = {}
        for part in split.query.split("&") if split.query else []:
            k, _, v = part.partition("=")
            query[unquote(k.replace("+", " "))] = unquote(v.replace("+", " "))
        headers = {k.lower(): v for k, v in self.headers.items()}
        ctx = Ctx(self.standin, self.command, path, query, headers, body)
        resp = self.standin.handle(ctx)
        if resp is None:  # a dropped connection (fault injection)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        data, ctype = resp.encode()
        self.send_response(resp.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", ctx.headers.get("x-ms-client-request-id", "standin"))
        for k, v in resp.headers.items():
            if k.lower() != "content-type":
                self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, tls: TlsFiles):
        super().__init__(addr, handler)
        self._ctx = tls.server_context()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ValueError):
            return
        super().finish_request(request, client_address)


# ---- the stand-in -----------------------------------------------------------------------------------------
class StandIn:
    """Everything the SDK needs, on 127.0.0.1. Use `start_standin()`; attributes below are the test API."""

    def __init__(
        self,
        tmp_dir: Path,
        *,
        port: int | None = None,
        state_delay_s: float = 0.5,
        image_aliases: dict[str, str] | None = None,
    ):
        self.tmp_dir = Path(tmp_dir)
        self.state_delay_s = state_delay_s  # how long each lifecycle state lasts at least
        self.image_aliases = image_aliases  # base image prefix -> local image (None: images.DEFAULT_ALIASES)
        self.state = st.State()
        self.port = port or free_port()
        self.tls = make_tls(self.tmp_dir / "tls")
        self.azurite = Azurite(self.tmp_dir / "azurite", self.tls.cert, self.tls.key, self.tls.ca_bundle)
        self.mlflow = MlflowServer(self.tmp_dir / "mlflow", self.workspace_path_prefix(), self.tls.cert, self.tls.key)
        self.executor = Executor(self)
        self.router = Router()
        for mod in (routes_auth, routes_control, routes_runhistory, routes_keyvault, routes_mlflow):
            mod.register(self.router)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # The SDK registers a cloud by name once per process: a name per stand-in lets several run in one process
        self.cloud_name = f"{CLOUD_NAME}{self.port}"

    # ---- names and URLs ------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def subscription(self) -> str:
        return st.SUBSCRIPTION

    @property
    def resource_group(self) -> str:
        return st.RESOURCE_GROUP

    @property
    def workspace(self) -> str:
        return st.WORKSPACE

    @property
    def workspace_id(self) -> str:
        return (
            f"/subscriptions/{st.SUBSCRIPTION}/resourceGroups/{st.RESOURCE_GROUP}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{st.WORKSPACE}"
        )

    def resolver_hook_dir(self) -> Path:
        """A folder with a sitecustomize.py that installs the *.localhost resolver; jobs get it on PYTHONPATH."""
        d = self.tmp_dir / "pyhook"
        d.mkdir(parents=True, exist_ok=True)
        (d / "sitecustomize.py").write_text(_HOOK)
        return d

    def workspace_path_prefix(self) -> str:
        return f"/mlflow/v2.0{self.workspace_id}"

    @property
    def mlflow_uri(self) -> str:
        """https form of the workspace tracking URI (plain mlflow with MLFLOW_TRACKING_TOKEN set)."""
        return f"{self.base_url}/mlflow/v2.0{self.workspace_id}"

    @property
    def mlflow_azureml_uri(self) -> str:
        """azureml:// form, as the workspace reports it (azureml-mlflow rewrites v1.0 -> v2.0 and uses https)."""
        return f"azureml://127.0.0.1:{self.port}/mlflow/v1.0{self.workspace_id}"

    @property
    def aml_audience(self) -> str:
        """The resource id of the control plane, run history and MLflow (resource_manager in cloud metadata)."""
        return self.base_url + "/"

    def extra_hosts(self) -> dict[str, str]:
        """Host names a job container resolves to the stand-in's loopback services (its /etc/hosts)."""
        return {f"{ACCOUNT}.blob.core.localhost": "127.0.0.1", f"{KEY_VAULT_NAME}.vault.localhost": "127.0.0.1",
                "vault.localhost": "127.0.0.1"}  # fmt: skip

    def mlflow_token(self) -> str:
        """A user token for the workspace MLflow endpoint (what `orch status` gets from its credential)."""
        return self.state.issue_token(st.CLIENT_ID, self.aml_audience)[0]

    @property
    def key_vault_url(self) -> str:
        """Like https://{vault}.vault.azure.net/: a sub-domain of the challenge resource, so SecretClient's
        default verify_challenge_resource check passes. *.localhost resolves through the resolver hook."""
        return f"https://{KEY_VAULT_NAME}.vault.localhost:{self.port}/"

    @property
    def key_vault_resource(self) -> str:
        return f"https://vault.localhost:{self.port}"

    def cloud_metadata(self) -> dict[str, str]:
        return {
            "azure_portal": self.base_url + "/",
            "resource_manager": self.base_url + "/",
            "active_directory": self.base_url + "/",
            "aml_resource_id": self.base_url + "/",
            "storage_endpoint": self.azurite.storage_endpoint,
            "registry_discovery_endpoint": self.base_url + "/",
        }

    @property
    def settings(self) -> dict[str, Any]:
        env = {
            "REQUESTS_CA_BUNDLE": str(self.tls.ca_bundle),
            "SSL_CERT_FILE": str(self.tls.ca_bundle),
            # Credentials: MSI_ENDPOINT/MSI_SECRET make ManagedIdentityCredential and DefaultAzureCredential get
            # tokens from the stand-in. AZURE_CLIENT_ID/SECRET are deliberately NOT exported: EnvironmentCredential
            # would run MSAL instance discovery against the public login host.
            "MSI_ENDPOINT": f"{self.base_url}/msi/token",
            "MSI_SECRET": self.state.host_msi_secret,
            "AZURE_SUBSCRIPTION_ID": st.SUBSCRIPTION,
            "AZURE_RESOURCE_GROUP": st.RESOURCE_GROUP,
            "AZUREML_WORKSPACE_NAME": st.WORKSPACE,
            "AZURE_KEYVAULT_URL": self.key_vault_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.tls.ca_bundle),
            # orch's workspace settings: the cloud is this stand-in's (the SDK's sovereign-cloud path)
            "ORCH_AZURE_CLOUD": self.cloud_name,
            "ORCH_AZURE_CLOUD_METADATA": json.dumps(self.cloud_metadata()),
        }
        return {
            "subscription_id": st.SUBSCRIPTION,
            "resource_group": st.RESOURCE_GROUP,
            "workspace_name": st.WORKSPACE,
            "tenant_id": st.TENANT,
            "client_id": st.CLIENT_ID,
            "client_secret": st.CLIENT_SECRET,
            "authority": self.base_url,
            "cloud": self.cloud_name,
            "cloud_metadata": self.cloud_metadata(),
            "ca_bundle": str(self.tls.ca_bundle),
            "ca_cert": str(self.tls.ca_cert),
            "base_url": self.base_url,
            "key_vault_url": self.key_vault_url,
            "mlflow_tracking_uri": self.mlflow_uri,
            "mlflow_tracking_uri_azureml": self.mlflow_azureml_uri,
            "storage_account_url": self.azurite.account_url,
            "default_datastore": "workspaceblobstore",
            "env": env,
        }

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self, set_env: bool = True) -> StandIn:
        install_localhost_resolver()
        if set_env:
            # The SDK, azure-storage-blob and mlflow read the CA bundle from the environment (requests).
            os.environ["REQUESTS_CA_BUNDLE"] = str(self.tls.ca_bundle)
            os.environ["SSL_CERT_FILE"] = str(self.tls.ca_bundle)
            os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(self.tls.ca_bundle)
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = _Server(("127.0.0.1", self.port), handler, self.tls)
        self._thread = threading.Thread(target=self._server.serve_forever, name="azure-standin", daemon=True)
        self._thread.start()
        # Azurite and MLflow start in parallel: both take seconds.
        errors: list[BaseException] = []

        def run(fn: Any) -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(f,)) for f in (self.azurite.start, self.mlflow.start)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        routes_control.seed_workspace(self)
        return self

    def stop(self) -> None:
        self.executor.shutdown()
        # Kept for debugging: what the SDK asked, in order (no Authorization headers are ever stored).
        with contextlib.suppress(OSError, TypeError):
            (self.tmp_dir / "request-log.json").write_text(json.dumps(self.request_log, indent=1, default=str))
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.mlflow.stop()
        self.azurite.stop()

    # ---- request handling -----------------------------------------------------------------------------
    def handle(self, ctx: Ctx) -> Response | None:
        route, match, path_known = self.router.match(ctx.method, ctx.path)
        admin = route is not None and route.auth == "admin"
        entry: dict[str, Any] | None = None
        if not admin:
            entry = {
                "time": time.time(),
                "method": ctx.method,
                "path": ctx.path,
                "query": dict(ctx.query),
                "headers": {k: v for k, v in ctx.headers.items() if k not in SECRET_HEADERS},
                "body": _body_text(ctx.body),
                "route": route.name if route else None,
                "status": None,
                "fault": None,
                "response": None,
            }
            with self.state.lock:
                self.state.request_log.append(entry)
        try:
            resp = self._handle(ctx, route, match, path_known, entry)
        except HttpError as e:
            resp = arm_error(e.status, e.code, e.message)
            resp.headers.update(e.headers)
        except Exception as e:  # noqa: BLE001 - a stand-in bug must show up as a 500 with the reason
            import traceback

            traceback.print_exc()
            resp = arm_error(500, "StandInError", f"{type(e).__name__}: {e}")
        if entry is not None:
            entry["status"] = resp.status if resp is not None else "dropped"
            if resp is not None:
                entry["response"] = _body_text(resp.encode()[0])
        return resp

    def _handle(self, ctx: Ctx, route: Any, match: Any, path_known: bool, entry: Any) -> Response | None:
        if route is None:
            why = "method not allowed" if path_known else "no such route"
            self._unknown(ctx, why)
            return arm_error(
                405 if path_known else 404,
                "NoSuchRoute",
                f"azure stand-in: {why}: {ctx.method} {ctx.path} (add it to tests/azure_standin if the SDK needs it)",
            )
        if route.api_versions is not None and ctx.api_version not in route.api_versions:
            self._unknown(ctx, f"unknown api-version {ctx.api_version!r} for route {route.name}")
            return arm_error(
                400,
                "InvalidApiVersionParameter",
                f"azure stand-in: api-version {ctx.api_version!r} is not served for {route.name}; "
                f"served: {sorted(route.api_versions)}",
            )
        fault = None
        if route.auth != "admin":
            fault = self.state.take_fault(ctx.method, ctx.path)
            if fault is not None:
                entry["fault"] = fault.kind
                if fault.kind == "drop":
                    return None
            if fault is not None and fault.kind != "commit-drop":  # commit-drop: after authentication, below
                status = int(fault.kind)
                return Response(
                    status,
                    {"error": {"code": "TooManyRequests" if status == 429 else "ServiceUnavailable",
                               "message": f"injected fault {fault.kind}"}},
                    {"Retry-After": "1"},
                )  # fmt: skip
        if route.auth == "bearer":
            claims = self.state.check_token(ctx.headers.get("authorization"))
            challenge = {"WWW-Authenticate": f'Bearer authorization_uri="{self.base_url}/{st.TENANT}"'}
            if claims is None:
                return Response(
                    401, {"error": {"code": "AuthenticationFailed", "message": "missing or invalid bearer token"}},
                    challenge,
                )  # fmt: skip
            if not st.audience_ok(claims, {self.aml_audience}):
                return Response(
                    401,
                    {"error": {"code": "InvalidAuthenticationTokenAudience",
                               "message": f"The access token has been obtained for wrong audience or resource "
                                          f"'{claims.get('aud')}'. It should exactly match with one of the allowed "
                                          f"audiences '{self.aml_audience}'."}},
                    challenge,
                )  # fmt: skip
        if route.api_versions is not None and ctx.method in ("PUT", "POST", "PATCH") and ctx.body:
            try:  # the body against the service's OpenAPI schema for this api-version (a refusal is a real 400)
                openapi.check_request(ctx.method, ctx.path, ctx.api_version, ctx.json())
            except HttpError as e:
                with self.state.lock:
                    self.state.refused_bodies.append(
                        {"method": ctx.method, "path": ctx.path, "api_version": ctx.api_version, "why": e.message}
                    )
                raise
        if fault is not None and fault.kind == "commit-drop":
            route.handler(ctx, match)  # the service commits the request; the answer never arrives
            return None
        return route.handler(ctx, match)

    def _unknown(self, ctx: Ctx, why: str) -> None:
        with self.state.lock:
            self.state.unknown_requests.append(
                {"method": ctx.method, "path": ctx.path, "query": dict(ctx.query), "why": why}
            )

    # ---- test API ------------------------------------------------------------------------------------
    @property
    def request_log(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.request_log)

    @property
    def unknown_requests(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.unknown_requests)

    def requests(self, method: str | None = None, path_regex: str | None = None) -> list[dict[str, Any]]:
        """Logged requests filtered by method and a regex searched in the path."""
        rx = re.compile(path_regex, re.IGNORECASE) if path_regex else None
        return [
            r for r in self.request_log
            if (method is None or r["method"] == method) and (rx is None or rx.search(r["path"]))
        ]  # fmt: skip

    def clear_request_log(self) -> None:
        with self.state.lock:
            self.state.request_log.clear()

    def inject_fault(self, path_regex: str, kind: str | int = 503, count: int = 1, method: str | None = None) -> Any:
        """Answer the next `count` requests whose path matches `path_regex` (and `method`) with 429, 503, a
        dropped connection ("drop"), or carry them out and then drop the connection ("commit-drop": the
        service committed the request but the client never hears so)."""
        kind = str(kind)
        if kind not in ("429", "503", "drop", "commit-drop"):
            raise ValueError("fault kind must be 429, 503, 'drop' or 'commit-drop'")
        fault = st.Fault(re.compile(path_regex, re.IGNORECASE), kind, count, method.upper() if method else None)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def set_secret(self, name: str, value: str) -> None:
        routes_keyvault.set_secret(self, name, value)

    def seed_datastore_files(self, src: Path | str, path: str, datastore: str = "workspaceblobstore") -> str:
        """Upload a local file/folder to `datastore` under `path`; returns azureml://datastores/{d}/paths/{path}/."""
        ds = routes_control.get_datastore(self, datastore)
        self.azurite.upload_folder(Path(src), ds["properties"]["containerName"], path)
        suffix = "" if Path(src).is_file() else "/"
        return f"azureml://datastores/{datastore}/paths/{path.strip('/')}{suffix}"

    def seed_registry_model(self, registry: str, name: str, version: str, src: Path | str, **kw: Any) -> str:
        """Upload a local folder into the registry's storage container and register it as a model version;
        returns azureml://registries/{registry}/models/{name}/versions/{version}."""
        return routes_control.seed_registry_model(self, registry, name, str(version), Path(src), **kw)

    def credential(self) -> Any:
        """A real azure-identity credential that gets tokens from the stand-in's login route."""
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(
            st.TENANT,
            st.CLIENT_ID,
            st.CLIENT_SECRET,
            authority=self.base_url,
            disable_instance_discovery=True,
            additionally_allowed_tenants=["*"],
        )

    def ml_client(self, registry_name: str | None = None, credential: Any = None, **kwargs: Any) -> Any:
        """A real MLClient pointed at the stand-in through the SDK's sovereign-cloud path (cloud_metadata)."""
        from azure.ai.ml import MLClient

        _check_cloud_registration(self.cloud_name, self.cloud_metadata())
        common = dict(cloud=self.cloud_name, cloud_metadata=self.cloud_metadata(), **kwargs)
        cred = credential or self.credential()
        if registry_name:
            return MLClient(cred, subscription_id=st.SUBSCRIPTION, resource_group_name=st.RESOURCE_GROUP,
                            registry_name=registry_name, **common)  # fmt: skip
        return MLClient(cred, st.SUBSCRIPTION, st.RESOURCE_GROUP, st.WORKSPACE, **common)

    def secret_client(self, credential: Any = None) -> Any:
        from azure.keyvault.secrets import SecretClient

        return SecretClient(self.key_vault_url, credential or self.credential())

    def wait_job(self, name: str, timeout: float = 600) -> str:
        """Wait for a job to reach a terminal state; returns the status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.state.lock:
                job = self.state.jobs.get(name)
                if job and job.status in ("Completed", "Failed", "Canceled"):
                    return job.status
            time.sleep(0.2)
        raise TimeoutError(f"job {name} not terminal after {timeout}s")


def _check_cloud_registration(name: str, metadata: dict[str, str]) -> None:
    """The SDK registers a cloud once per process; a second stand-in with other ports would silently reuse the
    first one's URLs. Fail loudly instead."""
    try:
        from azure.ai.ml._azure_environments import _environments
    except ImportError:  # pragma: no cover - SDK internals moved
        return
    existing = _environments.get(name)
    if existing and existing.get("resource_manager_endpoint") not in (None, metadata["resource_manager"]):
        raise RuntimeError(
            f"cloud {name!r} is already registered in this process with other URLs; one stand-in per process"
        )


def _body_text(data: bytes) -> Any:
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes>"


@contextlib.contextmanager
def start_standin(
    tmp_dir: Path | str,
    *,
    port: int | None = None,
    state_delay_s: float = 0.5,
    image_aliases: dict[str, str] | None = None,
    seed_models: dict[str, Path | str] | None = None,
    seed_datastore: dict[str, Path | str] | None = None,
    secrets: dict[str, str] | None = None,
    registry: str = "orch-registry",
    set_env: bool = True,
) -> Iterator[StandIn]:
    """Start Azurite + MLflow + the TLS stand-in under tmp_dir; yields the StandIn; stops all on exit.

    seed_models: name -> folder, registered as azureml://registries/{registry}/models/{name}/versions/1.
    seed_datastore: path -> local file/folder, uploaded to workspaceblobstore at that path.
    """
    s = StandIn(Path(tmp_dir), port=port, state_delay_s=state_delay_s, image_aliases=image_aliases)
    s.start(set_env=set_env)
    try:
        for name, src in (seed_models or {}).items():
            s.seed_registry_model(registry, name, "1", src)
        for path, src in (seed_datastore or {}).items():
            s.seed_datastore_files(src, path)
        for k, v in (secrets or {}).items():
            s.set_secret(k, v)
        yield s
    finally:
        s.stop()


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)


__all__ = ["StandIn", "start_standin", "install_localhost_resolver", "shutil"]
