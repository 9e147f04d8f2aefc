"""Files orch ships beside its code: environments/*.conda.yaml and the demo job (jobs/tone-classification).

Why one place: a checkout has them at the repository's top (README's paths: `environments/cpu-train.conda.yaml`,
`jobs/tone-classification/config.json`); a wheel cannot put files there, so it carries them as package data at
orchestrator/environments and orchestrator/jobs (pyproject's package-dir mapping). The two layouts keep the same
relative paths between them (a job's `../../environments/x.conda.yaml` holds in both), and the checkout wins where
both exist (an editable install reads the files you edit).
"""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../orchestrator
CHECKOUT_DIR = PACKAGE_DIR.parent  # the repository, when orch runs from a checkout
DEMO_JOB = "tone-classification"


def shipped_dir(name: str) -> Path:
    """`environments` or `jobs`: the checkout's folder if orch runs from one, else the installed package's."""
    checkout = CHECKOUT_DIR / name
    if (CHECKOUT_DIR / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return PACKAGE_DIR / name


def is_checkout() -> bool:
    """True when orch runs from a source checkout (its jobs/ are the user's to run in place)."""
    return shipped_dir("jobs") == CHECKOUT_DIR / "jobs"


def demo_job_dir(workdir: Path | None = None, *, create: bool = True) -> Path:
    """The demo job's folder, where it writes its data, models, cache and outputs.

    In a checkout: jobs/tone-classification of the checkout (what README and `make demo` use). Installed from a
    wheel: ./jobs/tone-classification of the working folder, copied there from the package on first use (the
    configs, the data script and the environments its systems name), since site-packages is no place to write
    outputs. A copy that exists is used as it is (the user may have edited it); create=False only locates it."""
    if is_checkout():
        return shipped_dir("jobs") / DEMO_JOB
    root = Path(workdir or Path.cwd())
    dest = root / "jobs" / DEMO_JOB
    if create and not (dest / "config.json").is_file():
        source = PACKAGE_DIR / "jobs" / DEMO_JOB
        dest.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file() and item.suffix in (".json", ".py", ".yaml"):
                shutil.copyfile(item, dest / item.name)
        envs = root / "environments"
        envs.mkdir(exist_ok=True)
        for env in (PACKAGE_DIR / "environments").glob("*.conda.yaml"):
            if not (envs / env.name).exists():
                shutil.copyfile(env, envs / env.name)
    return dest
