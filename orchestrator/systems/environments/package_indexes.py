"""Where pip finds packages: the host's pip settings (index, extra index, find-links, CA bundle), carried into
every build because users with private indexes need them wherever an environment is built; file:// indexes served
over loopback to a container build; and a probe that every index an install will read answers, so that a build
against an unreachable index stops in seconds naming it instead of retrying for many minutes."""

from __future__ import annotations

import configparser
import contextlib
import functools
import http.server
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from orchestrator.systems.environments.spec import EnvSpecError

INDEX_PROBE_TIMEOUT_S = 10.0  # how long an index may take to answer the probe before a build is refused


@dataclass(frozen=True)
class PipSettings:
    """Where pip finds packages on this host: config files + PIP_* env, as pip itself would read them."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    no_index: bool = False
    cert: str | None = None  # a CA bundle (corporate TLS proxies, private indexes): carried into builds

    @classmethod
    def from_host(cls, environ: dict[str, str] | None = None) -> PipSettings:
        """Read pip's config files (global, user, site; PIP_CONFIG_FILE) then PIP_* env, later wins (as pip)."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, str] = {}
        for cfg in _pip_config_files(env):
            parser = configparser.RawConfigParser()
            try:
                parser.read(cfg)
            except configparser.Error:
                continue
            for section in ("global", "install"):
                if parser.has_section(section):
                    values.update({k.replace("_", "-"): v for k, v in parser.items(section)})
        for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "no-index", "cert"):
            env_key = "PIP_" + key.upper().replace("-", "_")
            if env.get(env_key):
                values[key] = env[env_key]
        return cls(
            index_url=values.get("index-url") or None,
            extra_index_urls=tuple(values.get("extra-index-url", "").split()),
            find_links=tuple(values.get("find-links", "").split()),
            trusted_hosts=tuple(values.get("trusted-host", "").split()),
            no_index=values.get("no-index", "").lower() in ("1", "true", "yes", "on"),
            cert=values.get("cert") or None,
        )

    def as_pip_args(self) -> list[str]:
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for host in self.trusted_hosts:
            args += ["--trusted-host", host]
        return args

    def local_find_links(self) -> list[Path]:
        out = []
        for link in self.find_links:
            p = _local_path(link)
            if p is not None and p.exists():
                out.append(p)
        return out

    def without_local_find_links(self) -> PipSettings:
        return replace(self, find_links=tuple(f for f in self.find_links if _local_path(f) is None))

    def carry_find_links(self, dest: Path) -> int:
        """Copy (hardlink where possible) the files of local find-links folders into a build context."""
        n = 0
        for src in self.local_find_links():
            files = [src] if src.is_file() else [f for f in src.iterdir() if f.is_file()]
            for f in files:
                target = dest / f.name
                if target.exists():
                    continue
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
                n += 1
        return n


def _pip_config_files(env: dict[str, str]) -> list[str]:
    if env.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg_dirs = env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    home = Path(env.get("HOME", str(Path.home())))
    files = [str(Path(d) / "pip" / "pip.conf") for d in xdg_dirs] + ["/etc/pip.conf"]
    files += [
        str(home / ".pip" / "pip.conf"),
        str(Path(env.get("XDG_CONFIG_HOME", home / ".config")) / "pip" / "pip.conf"),
    ]
    files.append(str(Path(sys.prefix) / "pip.conf"))
    if env.get("PIP_CONFIG_FILE"):
        files.append(env["PIP_CONFIG_FILE"])
    return [f for f in files if os.path.isfile(f)]


def _local_path(link: str) -> Path | None:
    if link.startswith("file:"):
        return Path(unquote(urlparse(link).path))
    if "://" in link:
        return None
    return Path(link).expanduser()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass


@contextlib.contextmanager
def serve_local_indexes(settings: PipSettings) -> Iterator[PipSettings]:
    """Serve file:// indexes over loopback HTTP for the duration of a build (the build uses the host network).

    A container cannot see the host's file indexes (often gigabytes: too big for a build context), but with
    network_mode host it reaches 127.0.0.1, so each one is served read-only from its parent folder.
    """
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(url: str) -> str:
        p = _local_path(url)
        if p is None or not p.is_dir():
            return url
        root = p.parent
        handler = functools.partial(_QuietHandler, directory=str(root))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/{p.name}/"

    try:
        yield replace(
            settings,
            index_url=serve(settings.index_url) if settings.index_url else None,
            extra_index_urls=tuple(serve(u) for u in settings.extra_index_urls),
        )
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def package_indexes(settings: PipSettings, pip_options: list[str]) -> list[str]:
    """The index URLs an install reads: the spec's --index-url, else the host's (PyPI when none is set), and
    every --extra-index-url of both."""
    main: str | None = None
    extra: list[str] = []
    for i, opt in enumerate(pip_options):
        name, eq, inline = opt.partition("=")
        value = inline if eq else (pip_options[i + 1] if i + 1 < len(pip_options) else "")
        if name in ("--index-url", "-i") and value:
            main = value
        elif name == "--extra-index-url" and value:
            extra.append(value)
    no_index = settings.no_index or "--no-index" in pip_options
    urls = [] if no_index else [main or settings.index_url or "https://pypi.org/simple"]
    return list(dict.fromkeys([*urls, *settings.extra_index_urls, *extra]))


def probe_indexes(urls: list[str], *, cert: str | None = None, what: str = "",
                  timeout: float | None = None) -> None:  # fmt: skip
    """Each index answers an HTTP request within `timeout` seconds (any status: it is there), a file:// index
    exists; else EnvSpecError naming the index, how long it was given, and what to do. `timeout` defaults to
    INDEX_PROBE_TIMEOUT_S as it is when called (a test shortens it)."""
    import ssl
    import urllib.error
    import urllib.request

    timeout = INDEX_PROBE_TIMEOUT_S if timeout is None else timeout
    context = ssl.create_default_context(cafile=cert) if cert and os.path.isfile(cert) else None
    for url in urls:
        local = _local_path(url)
        if local is not None:
            if not local.exists():
                raise EnvSpecError(f"{what}: package index {url} does not exist on this host; fix the index setting")
            continue
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout, context=context):
                pass
        except urllib.error.HTTPError:
            continue  # it answered: reachable (a 401/404 is the installer's to report)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EnvSpecError(
                f"{what}: package index {url} is unreachable from this host ({type(reason).__name__}: {reason}; "
                f"waited {timeout:.0f} s); nothing was installed. Reach it (proxy, VPN), point pip at a mirror "
                "(PIP_INDEX_URL / PIP_EXTRA_INDEX_URL), or run this pass where the index is reachable"
            ) from None
