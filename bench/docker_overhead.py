"""What Docker costs: a cached-image container run of a job vs the same job on LocalSystem (median of N), and
the environment image build time with uv vs plain pip for the same conda.yaml.

    .venv/bin/python bench/docker_overhead.py [--runs 3] [--build-env PATH_OR_FAMILY] [--no-build]
                                              [--out DIR] [--no-write]

Why: DockerSystem is only worth it if a cached run costs seconds, not minutes, and uv is the default installer
only if it measurably beats pip. Prints a table and writes it between <!-- docker:start --> / <!-- docker:end -->
in bench/RESULTS.md (other sections are kept; --no-write: print it only). --out DIR keeps the measurements:
DIR/docker_overhead.json (every run's seconds, each build) and DIR/RESULTS_docker.md. --no-build leaves the image
builds out (they take minutes for cpu-export); the build compares installers only, so the conda.yaml need not hold
orch's runtime deps (the throw-away images never run a job).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from orchestrator.core.job import Job, JobState, ModelArtifact
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.systems.docker.images import DEFAULT_BASE_IMAGE, build_base_image, build_environment, docker_client
from orchestrator.systems.docker.system import DockerSystem
from orchestrator.systems.environments.spec import EnvSpecError, load_env_spec, resolve_env_file
from orchestrator.systems.local import LocalSystem

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "docker"  # its markers in bench/RESULTS.md


def _run(system: LocalSystem | DockerSystem, model: Path, out: Path, job_id: str) -> float:
    job = Job(
        job_id=job_id,
        pass_name="builder",
        pass_type="ModelBuilder",
        pass_config={"precision": "int4"},
        model=ModelArtifact(format="hf", path=str(model)),
        output_dir=str(out),
    )
    t = time.monotonic()
    state = system.submit(job).wait()
    elapsed = time.monotonic() - t
    if state != JobState.COMPLETED:
        raise SystemExit(f"{job_id}: {state.value}; see {out}/job.log")
    return elapsed


def bench_runs(runs: int, work: Path) -> dict[str, list[float]]:
    """Seconds of each run of the same ModelBuilder int4 job on LocalSystem and DockerSystem, alternating."""
    model = build_tiny_phi3(work / "tiny-phi3", texts=["the tone is happy", "the tone is sad"] * 40)
    docker = DockerSystem()
    docker.image_for(Job(job_id="warm", pass_name="x", pass_type="ModelBuilder", output_dir=str(work)))
    local = LocalSystem()
    times: dict[str, list[float]] = {"local": [], "docker": []}
    for i in range(runs):
        times["local"].append(_run(local, model, work / f"local-{i}", f"bench-local-{i}"))
        times["docker"].append(_run(docker, model, work / f"docker-{i}", f"bench-docker-{i}"))
    return times


INSTALLERS = ("uv", "pip")


def build_tag(installer: str) -> str:
    """A throw-away tag per installer and process: a concurrent run never removes this run's image."""
    return f"orch/bench:{installer}-{os.getpid()}"


def bench_builds(env: str) -> dict[str, dict[str, object]]:
    """Per installer: a forced build from scratch under a throw-away tag (removed afterwards): seconds, image MB,
    the installer the build used. The conda.yaml is not checked for orch's runtime deps: no job runs in these."""
    client = docker_client()
    out: dict[str, dict[str, object]] = {}
    for installer in INSTALLERS:
        tag = build_tag(installer)
        built = build_environment(env, installer=installer, tag=tag, force=True, require_orch_deps=False)
        try:
            out[installer] = {"seconds": built.seconds, "image_mb": built.size_bytes / 1e6,
                              "installer": built.installer, "built": built.built, "tag": tag}  # fmt: skip
        finally:
            client.images.remove(tag, force=True)
    return out


def render(res: dict) -> str:
    """The `docker` section from the measurements (`res`: what --out DIR/docker_overhead.json holds)."""
    med = {k: statistics.median(v) for k, v in res["runs"].items()}
    lines = [
        "## Docker overhead (bench/docker_overhead.py)",
        "",
        f"Host: {res['machine']}, {res['cpus']} CPUs, Docker engine {res['docker_version']}. "
        f"Job: ModelBuilder int4 on the tiny Phi-3, median of {len(res['runs']['local'])} runs; Docker with the "
        "cached cpu-export image (no build), orch source mounted.",
        "",
        *harness.table(
            ["what", "seconds"],
            "ll",
            [
                ["LocalSystem job (median)", f"{med['local']:.2f}"],
                ["DockerSystem job, cached image (median)", f"{med['docker']:.2f}"],
                ["Docker overhead per job", f"{med['docker'] - med['local']:+.2f}"],
            ],
        ),
    ]
    builds = res.get("builds")
    if builds:
        lines += [
            "",
            f"Image build of `{res['build_env']}` from scratch on {DEFAULT_BASE_IMAGE} (same conda.yaml, host pip "
            "settings carried; wheels downloaded through the host's package mirror/proxy):",
            "",
            *harness.table(
                ["installer", "build seconds", "image MB"],
                "lll",
                [[k, f"{b['seconds']:.1f}", f"{b['image_mb']:.0f}"] for k, b in builds.items()],
            ),
        ]
    else:
        lines += ["", "Image builds: not measured in this run (--no-build)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--build-env", default="cpu-export", help="conda.yaml (path or family) for the uv vs pip build")
    ap.add_argument("--no-build", action="store_true", help="leave the uv vs pip image builds out")
    ap.add_argument("--out", type=Path, help="keep docker_overhead.json and RESULTS_docker.md here")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs: at least 1")
    if not args.no_build:  # a bad conda.yaml is refused before the jobs run, not after
        try:
            load_env_spec(resolve_env_file(args.build_env))
        except EnvSpecError as exc:
            ap.exit(2, f"docker_overhead: error: --build-env: {exc}\n")
    build_base_image(DEFAULT_BASE_IMAGE)
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "docker_version": docker_client().version()["Version"],
        "build_env": None if args.no_build else args.build_env,
    }
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        res["runs"] = bench_runs(args.runs, Path(tmp))
    res["builds"] = None if args.no_build else bench_builds(args.build_env)
    text = render(res)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.out / "docker_overhead.json", res)
        harness.write_text(args.out / "RESULTS_docker.md", text)
    if not args.no_write:
        harness.write_section(RESULTS, SECTION, text.rstrip())


if __name__ == "__main__":
    main()
