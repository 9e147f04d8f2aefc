"""Request/response plumbing and the route table. Handlers are plain functions `(ctx, match) -> Response`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from .server import StandIn


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> tuple[bytes, str]:
        if self.body is None:
            return b"", self.headers.get("Content-Type", "application/json")
        if isinstance(self.body, bytes):
            return self.body, self.headers.get("Content-Type", "application/octet-stream")
        if isinstance(self.body, str):
            return self.body.encode(), self.headers.get("Content-Type", "text/plain; charset=utf-8")
        return json.dumps(self.body).encode(), "application/json; charset=utf-8"


@dataclass
class Ctx:
    standin: StandIn
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise HttpError(400, "BadRequest", f"request body is not JSON: {e}") from e

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode(errors="replace")).items()}

    @property
    def api_version(self) -> str | None:
        return self.query.get("api-version")


Handler = Callable[[Ctx, "re.Match[str]"], Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    api_versions: frozenset[str] | None  # None: the route takes no api-version; else the accepted ones
    handler: Handler
    auth: str  # "bearer" | "none" | "keyvault" | "msi" | "admin"
    name: str


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        api_versions: Iterable[str] | None,
        auth: str = "bearer",
        name: str | None = None,
    ) -> None:
        self.routes.append(
            Route(
                method,
                re.compile("^" + pattern + "$", re.IGNORECASE),
                frozenset(api_versions) if api_versions is not None else None,
                handler,
                auth,
                name or handler.__name__,
            )
        )

    def match(self, method: str, path: str) -> tuple[Route | None, re.Match[str] | None, bool]:
        """(route, match, path_known): path_known is True when some route matched the path but not the method."""
        path_known = False
        for r in self.routes:
            m = r.pattern.match(path)
            if m:
                if r.method == method:
                    return r, m, True
                path_known = True
        return None, None, path_known


def arm_error(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": code, "message": message, "details": [], "additionalInfo": []}})
