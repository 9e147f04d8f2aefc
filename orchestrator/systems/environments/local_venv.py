"""An EnvSpec realized on this host as a venv (uv if present, else pip), stamped with the spec's hash when whole,
so that a LocalSystem job runs in the environment its conda.yaml names and a second build of it is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.systems.environments.package_indexes import PipSettings, package_indexes, probe_indexes
from orchestrator.systems.environments.spec import EnvSpec, EnvSpecError, load_env_spec

VENV_STAMP = ".orch-env.json"  # written last by realize_venv: its presence means the venv is whole
NO_UV = "installer uv: no uv binary on this host (pip install uv, or use installer pip)"


def host_uv() -> Path | None:
    """This host's uv (beside this interpreter, else on PATH): the venv installer here, and the one a Docker build
    stage is handed (systems/docker/images)."""
    for candidate in (Path(sys.executable).parent / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def venv_realized(spec: EnvSpec, dest: Path) -> bool:
    """dest holds a finished venv of exactly this spec (realize_venv's stamp names its hash)."""
    stamp = dest / VENV_STAMP
    return (
        (dest / "bin" / "python").exists()
        and stamp.exists()
        and json.loads(stamp.read_text()).get("hash") == spec.hash()
    )


def realize_venv(
    spec: EnvSpec | Path | str,
    dest: Path | str,
    *,
    installer: str = "auto",
    pip_settings: PipSettings | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """Create a venv at dest with the spec's pip section (uv if present, else pip); return its python.

    The interpreter is this one, so its major.minor must match the spec's python. A stamp file with the spec
    hash makes a second call with the same spec a no-op.
    """
    spec = spec if isinstance(spec, EnvSpec) else load_env_spec(spec)
    found = ".".join(str(v) for v in sys.version_info[:3])
    spec.check_python(found, image=f"this host ({sys.executable})")
    dest = Path(dest)
    python = dest / "bin" / "python"
    stamp = dest / VENV_STAMP
    if venv_realized(spec, dest):
        return python
    shutil.rmtree(dest, ignore_errors=True)  # no stamp for this spec: another spec's venv or a build that died
    uv_bin = host_uv()
    use_uv = installer == "uv" or (installer == "auto" and uv_bin is not None)
    if use_uv and uv_bin is None:
        raise EnvSpecError(NO_UV)
    settings = pip_settings if pip_settings is not None else PipSettings.from_host()
    reqs = list(spec.pip_requirements)
    # every index the install will read answers now, or the build stops in seconds naming it (an unreachable
    # index would otherwise keep the installer retrying for many minutes)
    probe_indexes(package_indexes(settings, spec.pip_options), cert=settings.cert, what=spec.name or str(spec.source))
    if use_uv:
        args = settings.as_pip_args() + spec.pip_options
        _run([uv_bin, "venv", "--python", sys.executable, str(dest)], on_line)  # type: ignore[list-item]
        _run(
            [uv_bin, "pip", "install", "--python", str(python), "--index-strategy", "unsafe-best-match", *args, *reqs],
            on_line,
            env=INSTALLER_TIMEOUTS,
        )  # type: ignore[list-item]
    else:
        _run([sys.executable, "-m", "venv", str(dest)], on_line)
        # pip reads the host's pip config itself; pass only explicit settings and the spec's own options
        explicit = settings.as_pip_args() if pip_settings is not None else []
        _run([str(python), "-m", "pip", "install", *PIP_TIMEOUTS, *explicit, *spec.pip_options, *reqs], on_line)
    stamp.write_text(json.dumps({"hash": spec.hash(), "source": str(spec.source)}))
    return python


# A stalled download fails after a minute and is retried once, not the installers' defaults (pip: 5 retries with
# backoff; uv: several minutes per request): a build that cannot progress ends with the installer's error.
INSTALLER_TIMEOUTS = {"UV_HTTP_TIMEOUT": "60", "UV_HTTP_RETRIES": "1"}
PIP_TIMEOUTS = ["--timeout", "60", "--retries", "1"]


def _run(cmd: list[str], on_line: Callable[[str], None] | None, env: dict[str, str] | None = None) -> None:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env={**os.environ, **env} if env else None,
    )  # fmt: skip
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if on_line is not None:
            on_line(line.rstrip("\n"))
    if proc.wait() != 0:
        raise EnvSpecError(f"{cmd[0]} {cmd[1]} failed (exit {proc.returncode}): " + (tail[-1] if tail else ""))
