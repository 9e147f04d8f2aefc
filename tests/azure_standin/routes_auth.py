"""Token routes: an Entra-like login authority (OIDC discovery + client-credentials token endpoint) that
azure-identity's ClientSecretCredential uses, the Azure ML managed-identity endpoint (MSI_ENDPOINT/MSI_SECRET)
that ManagedIdentityCredential uses inside jobs, ARM cloud metadata, and the stand-in's admin routes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import state as st
from .web import Ctx, HttpError, Response

if TYPE_CHECKING:
    from .web import Router

GUID = r"[0-9a-fA-F-]{36}"


def openid_configuration(ctx: Ctx, m: re.Match[str]) -> Response:
    base = f"{ctx.standin.base_url}/{m['tenant']}"
    return Response(
        200,
        {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{base}/v2.0",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "local",
        },
    )


def token(ctx: Ctx, m: re.Match[str]) -> Response:
    form = ctx.form()
    if form.get("grant_type") != "client_credentials":
        return Response(400, {"error": "unsupported_grant_type", "error_description": "client_credentials only"})
    if form.get("client_id") != st.CLIENT_ID or form.get("client_secret") != st.CLIENT_SECRET:
        return Response(401, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret"})
    scope = form.get("scope", "")
    audience = scope.split()[0].removesuffix("/.default") if scope else ""
    tok, exp = ctx.standin.state.issue_token(st.CLIENT_ID, audience)
    return Response(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": tok})


def msi_token(ctx: Ctx, m: re.Match[str]) -> Response:
    """Azure ML compute's managed identity endpoint (api-version 2017-09-01, header `secret`)."""
    secret = ctx.headers.get("secret")
    with ctx.standin.state.lock:
        job = next((j for j in ctx.standin.state.jobs.values() if j.msi_secret == secret), None)
    host = secret is not None and secret == ctx.standin.state.host_msi_secret
    if job is None and not host:
        return Response(401, {"error": "invalid_request", "error_description": "unknown MSI secret"})
    resource = ctx.query.get("resource", "")
    if not resource:
        return Response(400, {"error": "invalid_request", "error_description": "resource is required"})
    if job is not None:
        tok, exp = ctx.standin.state.issue_token(st.JOB_IDENTITY_CLIENT_ID, resource, job=job.name)
    else:
        tok, exp = ctx.standin.state.issue_token(st.CLIENT_ID, resource)
    return Response(
        200,
        {
            "access_token": tok,
            "expires_on": str(exp),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": st.JOB_IDENTITY_CLIENT_ID,
        },
    )


def cloud_metadata(ctx: Ctx, m: re.Match[str]) -> Response:
    """ARM's metadata/endpoints for ARM_CLOUD_METADATA_URL (what azure-ai-ml / azureml-mlflow load)."""
    s = ctx.standin
    return Response(
        200,
        [
            {
                "name": s.cloud_name,
                "portal": s.base_url,
                "resourceManager": s.base_url + "/",
                "authentication": {
                    "loginEndpoint": s.base_url + "/",
                    "audiences": [s.base_url + "/"],
                    "tenant": "common",
                    "identityProvider": "AAD",
                },
                "suffixes": {"storage": s.azurite.storage_endpoint, "keyVaultDns": "vault.localhost"},
                "media": s.base_url,
                "graphAudience": s.base_url,
                "graph": s.base_url,
                "batch": s.base_url,
                "sqlManagement": s.base_url,
                "gallery": s.base_url,
                "activeDirectoryDataLake": s.base_url,
            }
        ],
    )


# ---- admin (not logged; for use by hand) ----------------------------------------------------------------
def admin_requests(ctx: Ctx, m: re.Match[str]) -> Response:
    return Response(200, ctx.standin.request_log)


def admin_unknown(ctx: Ctx, m: re.Match[str]) -> Response:
    return Response(200, ctx.standin.unknown_requests)


def admin_fault(ctx: Ctx, m: re.Match[str]) -> Response:
    body = ctx.json()
    try:
        f = ctx.standin.inject_fault(body["path_regex"], body.get("kind", 503), int(body.get("count", 1)),
                                     body.get("method"))  # fmt: skip
    except (KeyError, ValueError) as e:
        raise HttpError(400, "BadRequest", f"fault needs path_regex, kind (429|503|drop), count: {e}") from e
    return Response(200, {"path_regex": f.pattern.pattern, "kind": f.kind, "count": f.remaining})


def admin_secret(ctx: Ctx, m: re.Match[str]) -> Response:
    body = ctx.json()
    ctx.standin.set_secret(m["name"], body["value"])
    return Response(204)


def admin_settings(ctx: Ctx, m: re.Match[str]) -> Response:
    return Response(200, ctx.standin.settings)


def register(r: Router) -> None:
    r.add("GET", rf"/(?P<tenant>{GUID}|common|organizations)/v2\.0/\.well-known/openid-configuration",
          openid_configuration, api_versions=None, auth="none")  # fmt: skip
    r.add("POST", rf"/(?P<tenant>{GUID})/oauth2/v2\.0/token", token, api_versions=None, auth="none")
    r.add("GET", r"/msi/token", msi_token, api_versions={"2017-09-01"}, auth="none")
    r.add("GET", r"/metadata/endpoints", cloud_metadata, api_versions={"2019-05-01", "2020-06-01", "2022-09-01"},
          auth="none")  # fmt: skip
    r.add("GET", r"/_standin/requests", admin_requests, api_versions=None, auth="admin")
    r.add("GET", r"/_standin/unknown", admin_unknown, api_versions=None, auth="admin")
    r.add("GET", r"/_standin/settings", admin_settings, api_versions=None, auth="admin")
    r.add("POST", r"/_standin/faults", admin_fault, api_versions=None, auth="admin")
    r.add("PUT", r"/_standin/secrets/(?P<name>[^/]+)", admin_secret, api_versions=None, auth="admin")
