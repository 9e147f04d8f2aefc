"""Publishing a run's result into output_dir: model/ (+ adapter/), training.png and manifest.json, replaced as a
whole (a versioned folder + one symlink switch), and the model logged to MLflow."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestrator import __version__
from orchestrator.core.cache import Cache, folder_size
from orchestrator.core.errors import UserError
from orchestrator.core.fs import atomic_write_text, replace_dir, replace_link
from orchestrator.core.job import ModelArtifact, is_uri
from orchestrator.core.links import short
from orchestrator.engine.plots import plot_training_curves
from orchestrator.engine.steps import RunSummary, Step, StepRecord
from orchestrator.engine.tracking import Tracker, redact_obj

# Published outputs (see Publisher.publish): output_dir/.orch-versions/<version>/{model,adapter,manifest.json,...}
# holds each publication whole; output_dir/.orch-current is a symlink to the current one, switched by one rename;
# output_dir/model, adapter, manifest.json, training.png are fixed symlinks through .orch-current.
VERSIONS_DIR = ".orch-versions"
CURRENT_LINK = ".orch-current"
PUBLISHED = ("model", "adapter", "manifest.json", "training.png")


@dataclass
class Publisher:
    """Writes one workflow's publications; the engine hands it the summary of a finished run."""

    wf: Any
    cache: Cache
    output_dir: Path | None
    host_name: str
    target_name: str
    tracking_uri: str
    register_as: str

    def publish(
        self,
        summary: RunSummary,
        records: list[StepRecord],
        steps: list[Step],
        model: ModelArtifact | None,
        tracker: Tracker,
    ) -> None:
        """Publish model/ (+ adapter/), training.png and manifest.json into output_dir, atomically as a whole.

        Everything is written into a fresh output_dir/.orch-versions/<version>/ (real copies, or reflinks where
        the filesystem has them: never hard links, so editing an output cannot change the cache, and onnx's
        hard-link check passes), then output_dir/.orch-current is switched to it by one rename. The visible
        names (output_dir/model, manifest.json, ...) are symlinks through .orch-current, so a model and its
        manifest always change together; a run killed before the switch leaves the previous publication
        whole, and its half-written version folder is removed by the next publish. A file lock serializes runs
        sharing one output_dir.
        """
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._job_output():  # straight into output_dir (real copies): the service uploads it as it is
            self._write_publication(self.output_dir, summary, records, steps, model, tracker)
            return
        with FileLock(str(self.output_dir / ".orch-publish.lock")):
            versions = self.output_dir / VERSIONS_DIR
            version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            vdir = versions / version
            vdir.mkdir(parents=True)
            try:
                self._check_space(summary)
                self._write_publication(vdir, summary, records, steps, model, tracker)
            except BaseException as exc:  # a half-written version is never left behind (nor switched to)
                shutil.rmtree(vdir, ignore_errors=True)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._disk_full(summary) from None
                raise
            _switch_current(self.output_dir, version)

    def _needed_bytes(self, summary: RunSummary) -> int:
        """Bytes the publication copies: the final model (and adapter) folders."""
        model = summary.final_model
        if model is None:
            return 0
        paths = [model.path] + ([model.adapter_path] if model.format == "hf_adapter" and model.adapter_path else [])
        return sum(folder_size(p) for p in paths if not is_uri(p) and Path(p).exists())

    def _check_space(self, summary: RunSummary) -> None:
        """Refuse before copying when output_dir's disk cannot hold the model (a copy across filesystems; on one
        filesystem reflinks may need no space, so the copy is tried and a full disk caught as it happens)."""
        assert self.output_dir is not None
        model = summary.final_model
        if model is None or is_uri(model.path) or not Path(model.path).exists():
            return
        if os.stat(model.path).st_dev == os.stat(self.output_dir).st_dev:
            return
        if shutil.disk_usage(self.output_dir).free < self._needed_bytes(summary) + (1 << 20):
            raise self._disk_full(summary)

    def _disk_full(self, summary: RunSummary) -> PublishError:
        assert self.output_dir is not None
        free = shutil.disk_usage(self.output_dir).free
        return PublishError(
            f"engine.output_dir {short(self.output_dir)}: its disk is full ({_mb(free)} free, the model needs "
            f"{_mb(self._needed_bytes(summary))}); free space there or give another output folder: the passes' "
            "results stay in the cache, so the rerun only publishes"
        )

    def _job_output(self) -> bool:
        """output_dir is an Azure ML job output (AZURE_ML_OUTPUT_<name>), or ORCH_PUBLISH=flat: the service
        commits that folder as a whole when the job ends and uploads files, not links, so it is written flat."""
        if os.environ.get("ORCH_PUBLISH") == "flat":
            return True
        assert self.output_dir is not None
        here = self.output_dir.resolve()
        for key, value in os.environ.items():
            if key.startswith("AZURE_ML_OUTPUT_") and value and Path(value).resolve() == here:
                return True
        return False

    def _write_publication(
        self,
        folder: Path,
        summary: RunSummary,
        records: list[StepRecord],
        steps: list[Step],
        model: ModelArtifact | None,
        tracker: Tracker,
    ) -> None:
        """What one publication holds, written into `folder`: the model, the loss curves, the manifest."""
        self.export(summary, folder)
        curves = {r.name: self.cache.entry_dir(r.cache_key) for r in records}
        png = plot_training_curves(curves, folder / "training.png")
        if png is not None:
            tracker.log_artifact(png)
        if model is not None:
            if summary.prompt_format is not None:  # generation formats prompts as the model was trained
                for sub in ("model", "adapter"):
                    if (folder / sub).is_dir():
                        summary.prompt_format.write(folder / sub)
            logged = tracker.log_model(folder / "model", model.format, self.register_as)
            summary.model_uri = logged or summary.model_uri  # a recorded run's model when nothing was logged
            summary.registered_version = tracker.registered_version
            self._write_manifest(summary, steps, folder)

    def export(self, summary: RunSummary, dest: Path | None = None) -> None:
        """Copy the final model into dest (default output_dir): adapter/ + model/ for an adapter, else model/."""
        dest = dest or self.output_dir
        assert dest is not None
        dest.mkdir(parents=True, exist_ok=True)
        model = summary.final_model
        if model is None:
            return
        if model.format == "hf_adapter" and model.adapter_path:
            replace_dir(self._local(model.adapter_path), dest / "adapter")
        replace_dir(self._local(model.path), dest / "model")

    def _local(self, path: str) -> Path:
        """A local path for an artifact; a remote one (a job output left in the workspace) is downloaded once."""
        if not is_uri(path):
            return Path(path)
        from orchestrator.systems.azureml.download import download_reference

        local, _ = download_reference(path, cache=self.cache, field="final model")
        return Path(local)

    def _write_manifest(self, summary: RunSummary, steps: list[Step], vdir: Path) -> None:
        assert self.output_dir is not None
        model_dir = vdir / "model"
        manifest = {
            "orch_version": __version__,
            "workflow_id": getattr(self.wf, "workflow_id", None),
            "host": self.host_name,
            "target": self.target_name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input_model": self.wf.input_model.model_dump(mode="json", exclude_none=True),
            "input_model_identity": summary.input_identity,  # a hub model: hf://<id>@<the commit it ran on>
            "passes": [r.__dict__ for r in summary.steps],
            "final_model": {
                "format": summary.final_model.format if summary.final_model else None,
                "path": str(self.output_dir / "model"),
                "sha256": self.cache.content_hash(model_dir) if model_dir.exists() else None,
                "size_bytes": folder_size(model_dir) if model_dir.exists() else 0,
            },
            "metrics": summary.metrics,
            "prompt_format": summary.prompt_format.model_dump() if summary.prompt_format else None,
            "mlflow": {
                "tracking_uri": self.tracking_uri,
                "run_id": summary.mlflow_run_id,
                "model_uri": summary.model_uri,
                # where the model was registered: the tracking store's registry unless $MLFLOW_REGISTRY_URI said
                "registry_uri": summary.registry_uri,
                "registered_model": (
                    {"name": self.register_as, "version": summary.registered_version}
                    if summary.registered_version
                    else None
                ),
                # True: every pass was cached and this run logged nothing; run_id is the run that recorded them
                "recorded_earlier": summary.recorded,
            },
        }
        manifest = redact_obj(manifest)  # credentials inside URIs (tracking, SAS) never reach the file
        atomic_write_text(vdir / "manifest.json", json.dumps(manifest, indent=2, default=str))


class PublishError(UserError):
    """output_dir cannot take the publication (a full disk): one line with the folder and the space needed."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _switch_current(output_dir: Path, version: str) -> None:
    """Point output_dir/.orch-current at the version (one atomic rename), keep the visible names as links
    through it, and remove every other version folder."""
    target = Path(VERSIONS_DIR) / version
    replace_link(output_dir / CURRENT_LINK, target)
    vdir = output_dir / target
    for name in PUBLISHED:
        link = output_dir / name
        wanted = Path(CURRENT_LINK) / name
        if not (vdir / name).exists():
            if link.is_symlink():
                link.unlink()
            continue
        if link.is_symlink() and Path(os.readlink(link)) == wanted:
            continue
        if link.exists() and not link.is_symlink():  # a real folder/file from before versioned publishing
            trash = output_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            link.rename(trash)
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
        replace_link(link, wanted)
    for old in (output_dir / VERSIONS_DIR).iterdir():
        if old.name != version:
            shutil.rmtree(old, ignore_errors=True)

