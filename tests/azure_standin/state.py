"""In-memory state of the stand-in: workspace resources, jobs, secrets, tokens, the request log, unknown
requests and injected faults. One lock guards it all; handlers and the job executor share it."""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import jwt

SUBSCRIPTION = "00000000-0000-0000-0000-000000000001"
RESOURCE_GROUP = "orch-rg"
WORKSPACE = "orch-ws"
LOCATION = "local"
TENANT = "00000000-0000-0000-0000-0000000000aa"
CLIENT_ID = "00000000-0000-0000-0000-0000000000c1"  # the test/user service principal
CLIENT_SECRET = "local-standin-client-secret"  # not a secret: the stand-in accepts only this one
JOB_IDENTITY_CLIENT_ID = "00000000-0000-0000-0000-0000000000d1"  # the jobs' (managed) identity
BLOB_CONTAINER = "azureml-blobstore-00000000-0000-0000-0000-000000000001"
ARTIFACT_CONTAINER = "azureml"
REGISTRY_CONTAINER_PREFIX = "registry-"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def system_data(created: str | None = None) -> dict[str, Any]:
    c = created or now_iso()
    return {
        "createdAt": c,
        "createdBy": "orch-standin",
        "createdByType": "Application",
        "lastModifiedAt": now_iso(),
        "lastModifiedBy": "orch-standin",
        "lastModifiedByType": "Application",
    }


@dataclass
class Fault:
    pattern: re.Pattern[str]
    kind: str  # "429" | "503" | "drop" (no answer) | "commit-drop" (the request takes effect, the answer is lost)
    remaining: int
    method: str | None = None
    hits: int = 0


@dataclass
class JobRecord:
    name: str
    body: dict[str, Any]  # the PUT body's properties, as sent, plus service fields
    created: str
    status: str = "NotStarted"
    start_time: str | None = None
    end_time: str | None = None
    error: dict[str, Any] | None = None
    log_path: str | None = None
    log_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    msi_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    output_uris: dict[str, str] = field(default_factory=dict)  # output name -> azureml:// datastore URI
    cancel_requested: bool = False
    pid: int | None = None
    run_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    exit_code: int | None = None
    request_props: dict[str, Any] = field(default_factory=dict)  # the first PUT's properties, exactly as sent
    status_history: list[str] = field(default_factory=lambda: ["NotStarted"])
    log_dir: str | None = None
    uploaded_sizes: dict[str, int] = field(default_factory=dict)  # log file -> bytes uploaded
    image: str | None = None  # the environment image the job ran in
    paused: bool = False  # a node stopped answering (NotResponding)
    preempt_requested: bool = False
    preempt_requeue: bool = True  # False: the preemption ends the job Failed (capacity did not come back)
    preempts: int = 0
    attempts: int = 1


class State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.signing_key = secrets.token_bytes(32)
        # (kind, name) -> {version: resource dict}; kind in environments/codes/models/data
        self.assets: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.containers: dict[tuple[str, str], dict[str, Any]] = {}
        self.datastores: dict[str, dict[str, Any]] = {}
        self.computes: dict[str, dict[str, Any]] = {}  # lower-case name -> compute resource
        self.jobs: dict[str, JobRecord] = {}
        self.registry_models: dict[tuple[str, str, str], dict[str, Any]] = {}  # (registry, name, version)
        self.registries: set[str] = set()
        self.secrets: dict[str, list[dict[str, Any]]] = {}  # name -> versions, newest last
        self.request_log: list[dict[str, Any]] = []
        self.unknown_requests: list[dict[str, Any]] = []
        self.refused_bodies: list[dict[str, Any]] = []  # bodies the OpenAPI check answered 400 (openapi/)
        self.faults: list[Fault] = []
        self.pending_uploads: dict[str, str] = {}  # container -> "codes/name/version"
        # MSI secret for processes on the host (orch itself): ManagedIdentityCredential / DefaultAzureCredential
        # with MSI_ENDPOINT + MSI_SECRET get tokens for the user principal, all on loopback.
        self.host_msi_secret = secrets.token_urlsafe(24)

    # ---- tokens ---------------------------------------------------------------------------------------
    def issue_token(self, subject: str, audience: str, lifetime_s: int = 3600, **claims: Any) -> tuple[str, int]:
        exp = int(time.time()) + lifetime_s
        payload = {
            "aud": audience,
            "iss": f"https://sts.local/{TENANT}/",
            "sub": subject,
            "oid": subject,
            "tid": TENANT,
            "appid": subject,
            "iat": int(time.time()),
            "nbf": int(time.time()) - 5,
            "exp": exp,
            **claims,
        }
        return jwt.encode(payload, self.signing_key, algorithm="HS256"), exp

    def check_token(self, auth_header: str | None) -> dict[str, Any] | None:
        """The claims of a valid (signed, unexpired) bearer token issued by this stand-in, else None. The
        audience is the caller's to check (`audience_ok`): each service accepts its own."""
        if not auth_header or not auth_header.lower().startswith("bearer "):
            return None
        try:
            return jwt.decode(
                auth_header.split(" ", 1)[1].strip(), self.signing_key, algorithms=["HS256"],
                options={"verify_aud": False},
            )  # fmt: skip
        except jwt.PyJWTError:
            return None

    # ---- faults -----------------------------------------------------------------------------------------
    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.remaining > 0 and (f.method is None or f.method == method) and f.pattern.search(path):
                    f.remaining -= 1
                    f.hits += 1
                    return f
        return None


def audience_ok(claims: dict[str, Any], allowed: set[str]) -> bool:
    """ARM and Key Vault compare the token's `aud` with their own resource ids (a trailing / is ignored)."""
    aud = str(claims.get("aud", "")).rstrip("/").lower()
    return aud in {a.rstrip("/").lower() for a in allowed}
