"""What Docker costs: a cached-image container run of a job vs the same job on LocalSystem (median of N), and
the environment image build time with uv vs plain pip for the same conda.yaml.

    .venv/bin/python bench/docker_overhead.py [--runs 3] [--build-env PATH_OR_FAMILY]

Why: DockerSystem is only worth it if a cached run costs seconds, not minutes, and uv is the default installer
only if it measurably beats pip. Prints a table and writes it between <!-- docker:start --> / <!-- docker:end -->
in bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
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


def bench_runs(runs: int, work: Path) -> dict[str, float]:
    model = build_tiny_phi3(work / "tiny-phi3", texts=["the tone is happy", "the tone is sad"] * 40)
    docker = DockerSystem()
    docker.image_for(Job(job_id="warm", pass_name="x", pass_type="ModelBuilder", output_dir=str(work)))
    local = LocalSystem()
    times: dict[str, list[float]] = {"local": [], "docker": []}
    for i in range(runs):
        times["local"].append(_run(local, model, work / f"local-{i}", f"bench-local-{i}"))
        times["docker"].append(_run(docker, model, work / f"docker-{i}", f"bench-docker-{i}"))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_builds(env: str) -> dict[str, tuple[float, float]]:
    """(seconds, size MB) per installer; forced builds under throw-away tags, removed afterwards."""
    client = docker_client()
    out = {}
    for installer in ("uv", "pip"):
        tag = f"orch/bench:{installer}"
        built = build_environment(env, installer=installer, tag=tag, force=True)
        out[installer] = (built.seconds, built.size_bytes / 1e6)
        client.images.remove(tag, force=True)
    return out


def write_section(text: str) -> None:
    harness.write_section(RESULTS, SECTION, text.rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--build-env", default="cpu-export", help="conda.yaml (path or family) for the uv vs pip build")
    args = ap.parse_args()
    build_base_image(DEFAULT_BASE_IMAGE)
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        med = bench_runs(args.runs, Path(tmp))
    builds = bench_builds(args.build_env)
    cpus = len(__import__("os").sched_getaffinity(0))
    lines = [
        "## Docker overhead (bench/docker_overhead.py)",
        "",
        f"Host: {platform.machine()}, {cpus} CPUs, Docker engine {docker_client().version()['Version']}. "
        f"Job: ModelBuilder int4 on the tiny Phi-3, median of {args.runs} runs; Docker with the cached "
        f"cpu-export image (no build), orch source mounted.",
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
        "",
        f"Image build of `{args.build_env}` from scratch on {DEFAULT_BASE_IMAGE} (same conda.yaml, host pip "
        "settings carried; wheels downloaded through the host's package mirror/proxy):",
        "",
        *harness.table(["installer", "build seconds", "image MB"], "lll",
                       [[k, f"{s:.1f}", f"{mb:.0f}"] for k, (s, mb) in builds.items()]),  # fmt: skip
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text)


if __name__ == "__main__":
    main()
