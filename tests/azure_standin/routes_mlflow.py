"""The workspace MLflow endpoint: https://<stand-in>/mlflow/v2.0/<workspace ARM path>/..., bearer token required.

Azure ML serves MLflow's REST API under the workspace path on its regional API host and refuses requests without a
valid Azure ML token. Here the same path is forwarded to a real MLflow server on loopback once the token checks
out, so what a job logs through azureml-mlflow (azureml:// URI + MLFLOW_TRACKING_TOKEN) and what `orch status`
reads with a plain MlflowClient (https URI + token) is the real MLflow's behaviour."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import requests

from .web import Ctx, Response

if TYPE_CHECKING:
    from .web import Router

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "authorization"}


def forward(ctx: Ctx, m: re.Match[str]) -> Response:
    s = ctx.standin
    target = f"http://127.0.0.1:{s.mlflow.port}{ctx.path}"
    headers = {k: v for k, v in ctx.headers.items() if k not in HOP_HEADERS}
    r = requests.request(
        ctx.method, target, params=ctx.query, data=ctx.body or None, headers=headers, timeout=60,
        allow_redirects=False,
    )  # fmt: skip
    out_headers = {"Content-Type": r.headers.get("Content-Type", "application/json")}
    return Response(r.status_code, r.content, out_headers)


def register(r: Router) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        r.add(method, r"/mlflow/v2\.0/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
              r"Microsoft\.MachineLearningServices/workspaces/[^/]+/.*", forward, api_versions=None,
              auth="bearer", name=f"mlflow_{method.lower()}")  # fmt: skip
