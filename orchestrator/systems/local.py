"""LocalSystem: the runner in a subprocess of this machine, in its own process group.

orch's words on this system: a Job is a child process `python -m orchestrator.runner --job <out>/job.json`;
its log is <out>/job.log; cancel kills the whole process group (as MLflow's LocalSubmittedRun does), so
dataloader workers and builder subprocesses die with it. `python_environment_path` runs the Job under another
interpreter (a venv or conda env folder, or a python executable).

A pass whose environment conflicts with orch's own install (SIDE_ENVIRONMENTS: its pins cannot live beside
the export environment's) runs in a venv of that environment's conda.yaml, built once (ORCH_ENV_CACHE) and
reused while the spec's hash is the same: the same packaging Docker and Azure ML do with an image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.core.job import JOB_FILE, Job, JobResult, JobState
from orchestrator.core.launch import ProcessesPerNode, resolve_processes, runner_command
from orchestrator.systems.base import JobHandle, System, SystemFailure
from orchestrator.systems.environments.local_venv import realize_venv, venv_realized
from orchestrator.systems.environments.spec import EnvSpec, EnvSpecError, load_env_spec, resolve_env_file

LOG_FILE = "job.log"
PID_FILE = "job.pid"
ORCH_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the orchestrator package
# Environments whose pins conflict with orch's install (cpu-inc: numpy<2, onnx 1.16; *-quantize: llm-compressor's
# transformers 5.17): their jobs get a venv of their own.
SIDE_ENVIRONMENTS = frozenset({"cpu-inc", "cpu-quantize", "gpu-quantize"})


def resolve_python(python_environment_path: str | None) -> str:
    """The interpreter for jobs: this one, or the one inside python_environment_path (venv/conda) or the path."""
    if not python_environment_path:
        return sys.executable
    p = Path(python_environment_path).expanduser()
    for candidate in (p, p / "bin" / "python", p / "bin" / "python3", p / "python.exe", p / "Scripts" / "python.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemFailure(
        f"python_environment_path {python_environment_path!r} has no python interpreter "
        "(give a venv/conda folder or a python executable)"
    )


def _detach_and_die_with_parent() -> None:
    """In the child: its own process group (cancel kills the job and its children at once), and SIGKILL when
    the orch process dies, even by kill -9, so no orphan keeps writing into a staging folder."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalJobHandle(JobHandle):
    def __init__(self, job_id: str, out_dir: Path, proc: subprocess.Popen | None = None) -> None:
        self.job_id = job_id
        self.out_dir = out_dir
        self._proc = proc
        self._canceled = False

    def _pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        pid_file = self.out_dir / PID_FILE
        return int(pid_file.read_text()) if pid_file.exists() else None

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def status(self) -> JobState:
        if self._alive():
            return JobState.RUNNING
        if self._canceled:
            return JobState.CANCELED
        try:
            return JobResult.read(self.out_dir).status
        except (FileNotFoundError, ValueError):
            return JobState.FAILED

    def wait(self, timeout: float | None = None) -> JobState:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._alive():
            if deadline is not None and time.monotonic() > deadline:
                return JobState.RUNNING
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.2)
            else:
                time.sleep(0.2)
        return self.status()

    def logs(self, follow: bool = False) -> Iterator[str]:
        path = self.out_dir / LOG_FILE
        while not path.exists() and follow and self._alive():
            time.sleep(0.1)
        if not path.exists():
            return
        with path.open(errors="replace") as fh:
            buf = ""
            while True:
                chunk = fh.readline()
                if chunk:
                    buf += chunk
                    if buf.endswith("\n"):
                        yield buf.rstrip("\n")
                        buf = ""
                    continue
                if not follow or not self._alive():
                    rest = fh.read()
                    yield from (buf + rest).splitlines()
                    return
                time.sleep(0.1)

    def cancel(self) -> bool:
        pid = self._pid()
        if pid is None or not self._alive():
            return False
        self._canceled = True
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                if not self._alive():
                    break
                time.sleep(0.1)
            else:
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._proc is not None:
            self._proc.wait()
        return True

    def outputs(self, dest: Path | None = None) -> Path:
        return self.out_dir

    def log_tail(self, n: int = 30) -> str:
        path = self.out_dir / LOG_FILE
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


class LocalSystem(System):
    kind = "local"

    def __init__(
        self,
        *,
        python_environment_path: str | None = None,
        accelerators: list[str] | None = None,
        processes_per_node: ProcessesPerNode = "auto",
        environment_for: Callable[[Job], str | None] | None = None,
        env_cache: Path | None = None,
    ) -> None:
        self.python = resolve_python(python_environment_path)
        self.pinned_python = python_environment_path is not None  # the user's interpreter runs every job
        self.accelerators = accelerators or ["cpu"]
        self.processes_per_node = processes_per_node
        self.environment_for = environment_for
        self._specs: dict[str, EnvSpec] = {}
        # shared by every workflow, as Docker's images are: ORCH_ENV_CACHE, else ~/.cache/orch/envs
        self.env_cache = env_cache or Path(os.environ.get("ORCH_ENV_CACHE", "~/.cache/orch/envs")).expanduser()

    @classmethod
    def from_config(cls, config: dict, **context: object) -> LocalSystem:
        return cls(
            python_environment_path=config.get("python_environment_path"),
            accelerators=config.get("accelerators"),
            processes_per_node=config.get("processes_per_node") or "auto",
            environment_for=context.get("environment_for"),  # type: ignore[arg-type]
        )

    def side_environment(self, environment: str | None) -> str | None:
        """The environment family a job runs in a venv of its own, or None for this interpreter."""
        return None if self.pinned_python or environment not in SIDE_ENVIRONMENTS else environment

    def _side_spec(self, environment: str) -> EnvSpec:
        if environment not in self._specs:  # read once per system: plan, prepare and submit all ask
            try:
                self._specs[environment] = load_env_spec(resolve_env_file(environment))
            except EnvSpecError as exc:
                raise SystemFailure(str(exc)) from exc
        return self._specs[environment]

    def python_for(self, job: Job) -> str:
        """The interpreter that runs `job`: a side environment's venv (built here once), else self.python."""
        env = self.side_environment(self.environment_for(job) if self.environment_for else None)
        if env is None:
            return self.python
        spec = self._side_spec(env)
        dest = self.env_cache / f"{env}-{spec.hash()[:12]}"
        if venv_realized(spec, dest):
            return str(dest / "bin" / "python")
        dest.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        with FileLock(str(dest) + ".lock"):  # two runs wanting the same venv: one builds, the other waits
            if not venv_realized(spec, dest):
                log = dest.parent / f"{dest.name}.log"
                print(f"orch: building the {env} environment for this pass (once): {dest}; log {log}", file=sys.stderr)
                t0 = time.perf_counter()
                with log.open("w") as fh:
                    try:
                        realize_venv(spec, dest, on_line=lambda line: print(line, file=fh, flush=True))
                    except EnvSpecError as exc:
                        shutil.rmtree(dest, ignore_errors=True)
                        raise SystemFailure(f"environment {env}: {exc}; log {log}") from exc
                print(f"orch: {env} environment ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        return str(dest / "bin" / "python")

    def prepare(self, job: Job) -> None:
        self.python_for(job)

    def processes_for(self, pass_cls: type) -> int:
        return resolve_processes(
            self.processes_per_node, self.accelerators, data_parallel=getattr(pass_cls, "data_parallel", False)
        )

    def environment_fingerprint(self, libraries: tuple[str, ...], environment: str | None = None) -> dict[str, str]:
        side = self.side_environment(environment)
        if side is not None:  # the venv holds exactly the spec's pins: its hash names it, as an image's does
            return {"env_spec": self._side_spec(side).hash()}
        if self.python == sys.executable:
            return super().environment_fingerprint(libraries)
        code = (
            "import json,sys,importlib.metadata as m\n"
            "out={}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n]=m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))"
        )
        done = subprocess.run([self.python, "-c", code, *libraries], capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    def submit(self, job: Job) -> LocalJobHandle:
        out_dir = Path(job.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        job_path = job.write(out_dir / JOB_FILE)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ORCH_SOURCE_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable from a job unless the user says otherwise
        log = (out_dir / LOG_FILE).open("ab")
        try:
            proc = subprocess.Popen(
                runner_command(job, self.python_for(job), job_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=out_dir,
                preexec_fn=_detach_and_die_with_parent,
            )
        finally:
            log.close()
        (out_dir / PID_FILE).write_text(str(proc.pid))
        return LocalJobHandle(job.job_id, out_dir, proc)

    def attach(self, job_id: str) -> LocalJobHandle:
        """job_id is the job's output folder for local jobs."""
        return LocalJobHandle(Path(job_id).name, Path(job_id))
