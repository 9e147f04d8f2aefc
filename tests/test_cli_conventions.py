"""The command line as users of the ecosystem expect it: exit codes (2 for every user error, 1 for a failed run,
130 interrupted) with one `orch: error:` line and no traceback on every error path, help text on every flag,
`--version`, completion, `--json`, `-q` / `-v` anywhere, Olive's underscore spellings beside the dash ones,
files and folders written with ordinary modes.

The error paths run `orch` in its own process (python -m orchestrator.cli): environment variables, logging
filters and the exit code are exactly what a shell sees.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from orchestrator.cli.main import app

REPO = Path(__file__).resolve().parents[1]
# a loopback port nothing listens on: Azure endpoints and the sign-in authority fail at once, and nothing leaves
# the machine (a credential test must never reach a real Azure endpoint)
DEAD = "https://127.0.0.1:9"
LOOPBACK_CLOUD = json.dumps(
    {"resource_manager": f"{DEAD}/", "active_directory": f"{DEAD}/", "aml_resource_id": f"{DEAD}/",
     "storage_endpoint": "core.localhost:9", "registry_discovery_endpoint": f"{DEAD}/", "azure_portal": f"{DEAD}/"}
)  # fmt: skip


def ctrl_c_default() -> None:
    """Popen preexec_fn: Ctrl-C as a terminal delivers it. A suite started in the background of a non-interactive
    shell (`cmd &`) inherits SIGINT ignored, and a Python started with SIGINT ignored never raises
    KeyboardInterrupt: the child must get the default disposition a user's terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Azure / MLflow settings a developer's shell may carry."""
    drop = ("AZURE", "AZUREML", "MSI_", "IDENTITY_", "ORCH_AZURE", "MLFLOW_TRACKING")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONPATH": str(REPO), "COLUMNS": "200", **extra}


def orch(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
    )


def one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit code, no traceback anywhere, exactly one stderr line, `orch: error: ...` holding the needles."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == code, (proc.returncode, text)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- help, version, completion ---------------------------------------------------------------------------------
def _commands(command: typer.core.TyperGroup | typer.core.TyperCommand, path: str = "orch"):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, f"{path} {name}")


def test_every_flag_and_argument_has_help() -> None:
    """Walks every command's parameters (the Olive commands' flag tables, tune-session-params's included): none
    without help."""
    root = typer.main.get_command(app)
    missing = [
        f"{path} {'/'.join(p.opts) or p.name}"
        for path, command in _commands(root)
        for p in command.params
        if not (getattr(p, "help", None) or "").strip()
    ]
    assert missing == []
    assert len(list(_commands(root))) > 30  # the walk saw the whole tree


def test_help_shows_no_type_beside_on_off_flags_and_tune_session_params_looks_like_the_rest(tmp_path: Path) -> None:
    run_help = orch("run", "--help", cwd=tmp_path)
    assert run_help.returncode == 0 and "--dry-run" in run_help.stdout
    assert "<bool>" not in run_help.stdout and "<path>" in run_help.stdout  # flags bare, values typed
    tsp = orch("tune-session-params", "--help", cwd=tmp_path)
    assert tsp.returncode == 0, tsp.stderr
    assert "Usage: orch tune-session-params [OPTIONS]" in tsp.stdout and "╭─ Options" in tsp.stdout
    for flag in ("--model_name_or_path", "--opt_level_list", "--predict_with_kv_cache", "--host"):
        assert flag in tsp.stdout
    assert "<bool>" not in tsp.stdout and "usage: tune-session-params" not in tsp.stdout  # not argparse's


def test_version_and_completion(tmp_path: Path) -> None:
    from orchestrator import __version__

    for flag in ("--version", "-V"):
        v = orch(flag, cwd=tmp_path)
        assert v.returncode == 0 and v.stdout.strip() == f"orch {__version__}", v.stdout + v.stderr
    script = orch("--show-completion", "bash", cwd=tmp_path, env=clean_env(SHELL="/bin/bash"))
    assert script.returncode == 0 and "_ORCH_COMPLETE" in script.stdout, script.stdout + script.stderr
    # what the shell's completion function asks: the commands after `orch c`
    asked = orch(cwd=tmp_path, env=clean_env(_ORCH_COMPLETE="complete_bash", COMP_WORDS="orch ca", COMP_CWORD="1"))
    assert asked.returncode == 0 and "cache" in asked.stdout and "run" not in asked.stdout.split(), asked.stdout


# ---- error paths: exit code + one line ----------------------------------------------------------------------
@pytest.fixture
def wf(workflow_factory) -> Path:
    """A runnable copy of the demo workflow on the tiny model (nothing runs in the error cases)."""
    return workflow_factory(max_steps=2, passes=["lora"])


ERROR_CASES = [
    # (id, args (WF = a valid workflow), extra env, exit code, needles)
    ("unknown_command", ["nosuch"], {}, 2, ("No such command 'nosuch'",)),
    ("unknown_flag", ["run", "--nosuchflag"], {}, 2, ("No such option: --nosuchflag",)),
    ("missing_required", ["run"], {}, 2, ("--config",)),
    ("bad_int", ["finetune", "-m", "m", "-o", "o", "-d", "d", "--lora_r", "many"], {}, 2, ("--lora_r",)),
    ("missing_config", ["run", "--config", "missing.json"], {}, 2, ("missing.json not found",)),
    ("config_is_folder", ["run", "--config", "."], {}, 2, ("is a folder",)),
    ("latin1_config", ["run", "--config", "latin1.json"], {}, 2, ("not UTF-8", "0xe9", "save it as UTF-8")),
    ("unknown_host", ["run", "--config", "WF", "--host", "nosuch", "--dry-run"], {}, 2, ("'nosuch': no such system",)),
    ("unknown_target", ["run", "--config", "WF", "--target", "nosuch", "--dry-run"], {}, 2, ("no such system",)),
    ("no_workspace", ["status", "job-1"], {}, 2, ("no Azure ML workspace", "orch config set subscription_id")),
    ("no_workspace_logs", ["logs", "job-1"], {}, 2, ("no Azure ML workspace",)),
    ("no_workspace_run", ["run", "-c", "WF", "--host", "aml", "--no-tracking"], {}, 2, ("no Azure ML workspace",)),
    ("unknown_setting", ["config", "set", "nosuch", "v"], {}, 2, ("unknown setting 'nosuch'",)),
    ("ranks", ["logs", "job-1", "--all-ranks", "--rank", "1"], {}, 2, ("--all-ranks and --rank",)),
    ("cache_dir_missing", ["cache", "ls", "--cache-dir", "/nonexistent"], {}, 2, ("/nonexistent: does not exist",)),
    ("cache_dir_file", ["cache", "ls", "--cache-dir", "latin1.json"], {}, 2, ("is a file",)),
    ("cache_dir_not_cache", ["cache", "clean", "--cache-dir", "."], {}, 2, ("not an orch cache",)),
    ("generate_not_onnx", ["generate", "--model", ".", "-p", "hi"], {}, 2, ("no genai_config.json",)),
    ("tune_flag", ["tune-session-params", "-m", ".", "--nosuch"], {}, 2, ("tune-session-params", "--nosuch")),
    ("profile_not_json", ["status", "job-1"], {"ORCH_PROFILE": "latin1.json"}, 2, ("not valid JSON",)),
]


@pytest.mark.parametrize(
    ("args", "env", "code", "needles"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error_paths_exit_with_their_code_in_one_line(tmp_path: Path, wf: Path, args, env, code, needles) -> None:
    (tmp_path / "latin1.json").write_bytes('{"workflow_id": "caf\u00e9"}'.encode("latin-1"))
    args = [str(wf) if a == "WF" else a for a in args]
    profile = str(tmp_path / env.get("ORCH_PROFILE", "no-profile.json"))  # never the developer's own profile
    one_error_line(orch(*args, cwd=tmp_path, env=clean_env(ORCH_PROFILE=profile)), code, *needles)


def test_a_credential_failure_is_one_line_with_the_sign_in_hint(tmp_path: Path) -> None:
    """A service principal whose sign-in fails (the authority does not answer): azure-identity's own lines (one
    per credential tried) stay out, orch's line says which credential failed and how to sign in. Every endpoint
    is a dead loopback port: nothing is sent anywhere."""
    env = clean_env(
        ORCH_PROFILE=str(tmp_path / "profile.json"), AZURE_SUBSCRIPTION_ID="00000000-0000-0000-0000-000000000000",
        AZURE_RESOURCE_GROUP="rg", AZUREML_WORKSPACE_NAME="ws", ORCH_AZURE_CLOUD="LoopbackCloud",
        ORCH_AZURE_CLOUD_METADATA=LOOPBACK_CLOUD, AZURE_AUTHORITY_HOST=DEAD,
        AZURE_CLIENT_ID="11111111-1111-1111-1111-111111111111", AZURE_TENANT_ID="22222222-2222-2222-2222-222222222222",
        AZURE_CLIENT_SECRET="not-the-secret",
    )  # fmt: skip
    for args in (["status", "job-1"], ["logs", "job-1"], ["cancel", "job-1"]):
        line = one_error_line(orch(*args, cwd=tmp_path, env=env), 2, "Azure credentials: EnvironmentCredential")
        assert "`az login`" in line and "orch config show" in line and "not-the-secret" not in line


def test_a_missing_extra_names_its_pip_install(tmp_path: Path) -> None:
    """A core-only install has no torch: the command that needs it says which extra brings it. (torch is made
    unimportable in that process, as it is where the extra is not installed.)"""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # not installed\n"
        "from orchestrator.cli import run_cli\n"
        f"sys.exit(run_cli(['tiny-model', {str(tmp_path / 'm')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=clean_env())  # fmt: skip
    one_error_line(proc, 2, "orch tiny-model needs torch: pip install 'orch[train]'")
    assert not (tmp_path / "m").exists()


def test_ctrl_c_mid_pass_exits_130_in_one_line_and_caches_nothing(tmp_path: Path, workflow_factory) -> None:
    cfg = workflow_factory(max_steps=400, passes=["lora"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(cfg), "--no-tracking", "-q"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        preexec_fn=ctrl_c_default,
    )  # fmt: skip
    staging = tmp_path / "cache" / "tmp"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(staging.glob("*/job.log")):
        time.sleep(0.5)
    assert any(staging.glob("*/job.log")), "the LoRA pass never started"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, "interrupted")
    assert not any((tmp_path / "cache" / "runs").iterdir())


# ---- conventions on a real (short) run ---------------------------------------------------------------------
def test_a_short_run_quiet_json_spellings_and_modes(tmp_path: Path, workflow_factory) -> None:
    """One 2-step LoRA run, written the Olive way (`--dry_run`, `--tracking_uri`) and quietly (-q after the
    command): stdout carries the results only, stderr nothing; `cache ls` finds the workflow's cache from the
    folder above it and as --json; the cache entry and the output are 0644 files in 0755 folders."""
    job = tmp_path / "job"
    job.mkdir()
    cfg = workflow_factory(max_steps=2, passes=["lora"])
    doc = json.loads(cfg.read_text())
    doc["engine"]["cache_dir"] = str(job / ".orch" / "cache")
    cfg.write_text(json.dumps(doc))
    plan = orch("run", "--config", cfg, "--dry_run", "--tracking_uri", f"sqlite:///{tmp_path}/t.db", cwd=tmp_path)
    assert plan.returncode == 0 and "1 pass(es) would run" in plan.stdout, plan.stderr
    ran = orch("run", "--config", cfg, "--no_tracking", "-q", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.strip() == "" and "output: " in ran.stdout, ran.stdout + ran.stderr
    quiet_first = orch("-q", "run", "--config", cfg, "--no-tracking", cwd=tmp_path)
    assert quiet_first.returncode == 0 and quiet_first.stderr.strip() == "", quiet_first.stderr

    listed = orch("cache", "ls", "--json", cwd=tmp_path)  # from the folder above the workflow's .orch/cache
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["pass"] for r in rows] == ["lora"] and rows[0]["size_bytes"] > 0
    assert rows[0]["cache"] == str((job / ".orch" / "cache").resolve())
    by_config = json.loads(orch("cache", "ls", "--json", "--config", cfg, cwd=REPO).stdout)
    assert [r["key"] for r in by_config] == [r["key"] for r in rows]
    nothing = orch("cache", "ls", cwd=job / ".orch")  # no cache here nor below: it says where caches are
    assert nothing.returncode == 0 and "engine.cache_dir" in nothing.stderr, nothing.stderr

    umask = os.umask(0)
    os.umask(umask)
    out_dir = Path(json.loads(cfg.read_text())["engine"]["output_dir"])
    for root in (Path(rows[0]["cache"]) / "runs", out_dir / ".orch-versions"):
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            wanted = 0o777 & ~umask if path.is_dir() or mode & 0o100 else 0o666 & ~umask
            assert mode == wanted, f"{path}: {oct(mode)}"

    cleaned = orch("cache", "clean", "--config", cfg, cwd=tmp_path)
    assert cleaned.returncode == 0 and "removed 1 cache entry" in cleaned.stdout, cleaned.stdout + cleaned.stderr


def test_the_target_follows_a_host_given_on_the_command_line(wf: Path) -> None:
    """Olive's rule: evaluation runs on the host unless a target is named. The config's engine.target pairs
    with the config's engine.host; --host alone takes the evaluation with it."""
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    workflow = load_workflow(wf)  # engine.host local, engine.target local
    assert Engine(workflow, tracking=False).target_name == "local"
    assert Engine(workflow, host="docker", tracking=False).target_name == "docker"
    assert Engine(workflow, host="docker", target="local", tracking=False).target_name == "local"


def test_ctrl_c_in_orch_ui_says_the_server_stopped(tmp_path: Path) -> None:
    """Ctrl-C is how `orch ui` ends: exit 130 and one line about the MLflow server, no job (there is none)."""
    from orchestrator.engine.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "orch", "ui-run")
    tracker.log_metric("lora/train_loss", 2.5, 1)
    tracker.end("FINISHED")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"mlflow": {"tracking_uri": uri, "run_id": tracker.run_id}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--manifest", str(manifest), "--no-browser"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        preexec_fn=ctrl_c_default,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()  # blocks until the server answers /health and the URL is printed
    assert f"MLflow UI on run {tracker.run_id}" in first, first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, "MLflow UI server")
    assert "job" not in line
