"""Key Vault secrets at https://127.0.0.1:PORT/secrets/... with the real challenge flow: an unauthenticated
request gets 401 + WWW-Authenticate naming the authority and resource; the client then gets a token for
`resource/.default` and retries. The vault host (127.0.0.1:PORT) ends with the resource's host, so the
client's default verify_challenge_resource check passes."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import state as st
from .web import Ctx, Response

if TYPE_CHECKING:
    from .server import StandIn
    from .web import Router

KV_API_VERSIONS = {"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01"}


def set_secret(s: StandIn, name: str, value: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    ts = int(datetime.now(timezone.utc).timestamp())
    version = uuid.uuid4().hex
    bundle = {
        "value": value,
        "id": f"{s.key_vault_url}secrets/{name}/{version}",
        "attributes": {"enabled": True, "created": ts, "updated": ts, "recoveryLevel": "Recoverable+Purgeable",
                       "recoverableDays": 90},
        "tags": tags or {},
    }  # fmt: skip
    with s.state.lock:
        s.state.secrets.setdefault(name, []).append(bundle)
    return bundle


def _challenge(ctx: Ctx, why: str) -> Response:
    s = ctx.standin
    return Response(
        401,
        {"error": {"code": "Unauthorized", "message": why}},
        {"WWW-Authenticate": f'Bearer authorization="{s.base_url}/{st.TENANT}", resource="{s.key_vault_resource}"'},
    )


def _authorized(ctx: Ctx) -> Response | None:
    claims = ctx.standin.state.check_token(ctx.headers.get("authorization"))
    if claims is None:
        return _challenge(ctx, "AKV10000: Request is missing a Bearer or PoP token.")
    if claims.get("aud", "").rstrip("/") != ctx.standin.key_vault_resource.rstrip("/"):
        return _challenge(ctx, f"AKV10022: Invalid audience {claims.get('aud')!r}")
    return None


def get_secret(ctx: Ctx, m: re.Match[str]) -> Response:
    denied = _authorized(ctx)
    if denied:
        return denied
    with ctx.standin.state.lock:
        versions = ctx.standin.state.secrets.get(m["name"], [])
        version = m["version"]
        found = [b for b in versions if not version or b["id"].endswith("/" + version)]
    if not found:
        why = f"A secret with (name/id) {m['name']} was not found in this key vault."
        return Response(404, {"error": {"code": "SecretNotFound", "message": why}})
    return Response(200, found[-1])


def put_secret(ctx: Ctx, m: re.Match[str]) -> Response:
    denied = _authorized(ctx)
    if denied:
        return denied
    body = ctx.json()
    return Response(200, set_secret(ctx.standin, m["name"], body.get("value", ""), body.get("tags")))


def register(r: Router) -> None:
    name = r"/secrets/(?P<name>[0-9a-zA-Z-]+)(?:/(?P<version>[0-9a-fA-F]*))?/?"
    r.add("GET", name, get_secret, api_versions=KV_API_VERSIONS, auth="keyvault")
    r.add("PUT", r"/secrets/(?P<name>[0-9a-zA-Z-]+)/?", put_secret, api_versions=KV_API_VERSIONS, auth="keyvault")
