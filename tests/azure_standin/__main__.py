"""Start the local Azure stand-in by hand:

    python -m tests.azure_standin [--dir DIR] [--port PORT] [--seed-model NAME=PATH] [--seed-datastore PATH=SRC]
                                  [--secret NAME=VALUE] [--registry NAME] [--state-delay S]
                                  [--image-alias PREFIX=IMAGE] [--env-file FILE]

It starts Azurite, an MLflow server and the TLS stand-in, prints the settings orch needs (and the shell exports,
also written to DIR/env.sh: `source DIR/env.sh` points orch and the SDK at it), and runs until Ctrl-C. Jobs run in
containers of their environment's image on the local Docker engine (tests/azure_standin/images.py).
See infra/local-azure.md."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .server import start_standin


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise SystemExit(f"--{what} wants NAME=VALUE, got {v!r}")
        out[k] = val
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.azure_standin", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, help="state folder (certificates, Azurite data, MLflow db, jobs)")
    p.add_argument("--port", type=int, help="stand-in port (default: a free one)")
    p.add_argument("--seed-model", action="append", default=[], metavar="NAME=PATH",
                   help="register a local folder as azureml://registries/REGISTRY/models/NAME/versions/1")  # fmt: skip
    p.add_argument("--seed-datastore", action="append", default=[], metavar="PATH=SRC",
                   help="upload a local file/folder to workspaceblobstore at PATH")  # fmt: skip
    p.add_argument("--secret", action="append", default=[], metavar="NAME=VALUE", help="a Key Vault secret")
    p.add_argument("--registry", default="orch-registry", help="registry name for --seed-model")
    p.add_argument("--state-delay", type=float, default=1.0, help="seconds each job state lasts at least")
    p.add_argument("--image-alias", action="append", default=[], metavar="PREFIX=IMAGE",
                   help="serve base images starting with PREFIX from the local IMAGE (default: "
                        "mcr.microsoft.com/azureml/=orch/base:bookworm-py311)")  # fmt: skip
    p.add_argument("--env-file", type=Path, help="also write the shell exports to this file")
    a = p.parse_args(argv)

    folder = a.dir or Path(tempfile.mkdtemp(prefix="orch-standin-"))
    folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with start_standin(
        folder,
        port=a.port,
        state_delay_s=a.state_delay,
        image_aliases=_pairs(a.image_alias, "image-alias") or None,
        seed_models={k: Path(v) for k, v in _pairs(a.seed_model, "seed-model").items()},
        seed_datastore={k: Path(v) for k, v in _pairs(a.seed_datastore, "seed-datastore").items()},
        secrets=_pairs(a.secret, "secret"),
        registry=a.registry,
    ) as s:
        settings = s.settings
        exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in settings["env"].items())
        exports += f"\nexport AZUREML_CLOUD_METADATA={shlex.quote(json.dumps(settings['cloud_metadata']))}"
        (folder / "settings.json").write_text(json.dumps(settings, indent=2))
        (folder / "env.sh").write_text(exports + "\n")
        if a.env_file:
            a.env_file.write_text(exports + "\n")
        print(json.dumps(settings, indent=2))
        print("\n# shell exports (also in", folder / "env.sh", ")")
        print(exports)
        print(
            "\n# Python:\n"
            "#   from azure.identity import ClientSecretCredential\n"
            "#   from azure.ai.ml import MLClient\n"
            f"#   cred = ClientSecretCredential({settings['tenant_id']!r}, {settings['client_id']!r}, "
            f"{settings['client_secret']!r}, authority={settings['authority']!r}, disable_instance_discovery=True)\n"
            f"#   ml = MLClient(cred, {settings['subscription_id']!r}, {settings['resource_group']!r}, "
            f"{settings['workspace_name']!r}, cloud={settings['cloud']!r}, cloud_metadata=<cloud_metadata above>)\n"
            "#   (*.localhost host names: run infra/install-azurite.sh as root for /etc/hosts, or\n"
            f"#    export PYTHONPATH={s.resolver_hook_dir()} to resolve them in Python)\n"
            f"\nstand-in ready at {s.base_url} (state in {folder}); Ctrl-C stops it",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
