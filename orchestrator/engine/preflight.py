"""The pre-flight of one run: everything it will read or write, looked at once, read-only, in one order.

A bad input should cost the user a second, not a fine-tune: the engine calls `WorkflowCheck.run` before it plans
(hashes), submits or opens MLflow, and every problem is one line naming the field and the fix. Nothing here
writes a file. Remote references (azureml:..., datastores) are checked where they are downloaded; Hugging Face
hub ids are asked of the hub here (one short request each: it exists, the token may read it, or it is cached).
What each input must be is checked by its own module: model_check (model and adapter folders), data_config_check
(data files and splits), outputs_check (the folders a run writes), tracking_check (the tracking URI); devices.py
refuses a pass this host cannot run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.links import written_path
from orchestrator.engine.data_config_check import check_data_config, check_split
from orchestrator.engine.data_paths import hub_dataset_id, local_data_paths
from orchestrator.engine.devices import on_azureml
from orchestrator.engine.model_check import check_adapter_folder, check_model_folder
from orchestrator.engine.outputs_check import check_apart_from_inputs, check_writable_dir
from orchestrator.engine.preflight_error import PreflightError
from orchestrator.engine.tracking_check import check_tracking_uri
from orchestrator.passes.registry import load_pass
from orchestrator.systems.registry import keyword_of

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(field: str, value: str | None) -> None:
    """workflow_id & co name MLflow runs, registered models and folders: no '/', ':', spaces."""
    if value is None:
        return
    if not isinstance(value, str) or not NAME.match(value):
        raise PreflightError(
            f"{field} {value!r}: use letters, digits, '.', '_' and '-' only (at most 128, starting with a letter "
            "or digit); it names the MLflow run, the registered model and folders"
        )


@dataclass
class WorkflowCheck:
    """The pre-flight of one run: the workflow's inputs, folders and devices as this host and target see them."""

    wf: Any
    base_dir: Path
    cache_root: Path
    output_dir: Path | None
    host_name: str
    target_name: str
    providers: list[str]
    tracking_uri: str
    matched: set[str] = dataclasses.field(default_factory=set)  # weights_check digests known to match (its memo)

    def run(self, *, tracking: bool = True) -> None:
        """Every input checked before anything is hashed, written or submitted: raises PreflightError (one line:
        the field and the fix). `tracking`: check the tracking URI too."""
        from orchestrator.engine.resources import _as_dict, is_remote, local_model_path

        check_name("workflow_id", getattr(self.wf, "workflow_id", None))
        mlflow_cfg = getattr(self.wf.engine, "mlflow", None)
        check_name("engine.mlflow.register_model_name", getattr(mlflow_cfg, "register_model_name", None))
        check_writable_dir("engine.cache_dir", self.cache_root)
        if self.output_dir is not None:
            check_writable_dir("engine.output_dir", self.output_dir)
        self._check_outputs_apart_from_inputs(tracking=tracking)
        im = self.wf.input_model
        ref = _as_dict(im.model_ref)
        if not is_remote(ref):
            raw = local_model_path(ref)
            if raw:
                path = written_path(self.base_dir, str(raw))
                check_model_folder(path, "input_model.model_path", matched=self.matched)
            elif isinstance(ref, dict) and ref.get("type") == "hf_hub":  # asked of the hub now: exists, reachable
                from orchestrator.core import hub

                hub.pin(hub.HubRef(ref["name"], "model", ref.get("revision")), field="input_model.model_path")
                host = self.wf.systems.get(self.host_name)
                aml = on_azureml(self.wf.systems, self.host_name)
                if aml and hub.needs_token("model", ref["name"]) and not getattr(host, "hf_token", 0):
                    raise PreflightError(
                        f"input_model.model_path: model {ref['name']} is private or gated and the Azure ML job "
                        f"downloads it: set \"hf_token\": true on system {self.host_name!r} (the job reads the "
                        "workspace Key Vault's hf-token secret)"
                    )
        adapter = getattr(im, "adapter_path", None)
        if adapter:
            check_adapter_folder(written_path(self.base_dir, adapter), "input_model.adapter_path")
        # a user_script runs where the data is read; --host / --target may name a system the reader did not check
        names = dict.fromkeys([self.host_name, self.target_name])
        remote = [n for n in names if self._system_type(n) in ("docker", "aml")]
        rows: dict[str, int | None] = {}  # data config -> rows of its local files (None: not counted)
        for i, dc in enumerate(self.wf.data_configs):
            cfg = dc.model_dump(mode="json")
            if cfg.get("user_script") and remote:
                raise PreflightError(
                    f"data_configs[{i}].user_script: runs only on LocalSystem for now ({', '.join(remote)} is not "
                    "one); the script is not shipped with the job: run on a LocalSystem, or use "
                    "load_dataset_config + text_template instead of a script"
                )
            load = cfg.get("load_dataset_config") or {}
            if load.get("data_name") in ("json", "csv", "parquet", "text", "arrow") and not load.get("data_files"):
                raise PreflightError(
                    f"data_configs[{i}].load_dataset_config: data_name {load['data_name']!r} needs data_files "
                    "(the file(s) to read), e.g. --data_files data/train.jsonl"
                )
            if hub_dataset_id(load.get("data_name")):  # asked of the hub now; its files are read where it runs
                from orchestrator.core import hub

                field = f"data_configs[{i}].load_dataset_config.data_name"
                hub.pin(hub.HubRef(load["data_name"], "dataset", load.get("revision")), field=field)
                rows[dc.name] = None
            else:
                rows[dc.name] = check_data_config(cfg, self.base_dir, f"data_configs[{i}]")
            check_split(f"data_configs[{i}].load_dataset_config.split", load.get("split"), cfg, rows[dc.name])
        data = {dc.name: dc.model_dump(mode="json") for dc in self.wf.data_configs}
        for name, entry in self.wf.passes.items():
            for ref in load_pass(entry.type).split_refs(entry.config or {}):
                check_split(
                    f"passes.{name}.{ref.field}", ref.split, data.get(ref.data_config or ""), rows.get(ref.data_config)
                )
            self._check_held_out(name, entry, rows)
        self._check_evaluator_device()
        self._check_written_secrets()
        if tracking:
            check_tracking_uri(self.tracking_uri)

    def _check_written_secrets(self) -> None:
        """A token written into a pass or data config travels to a local or Docker job as a private file; an
        Azure ML job can only read secrets from the workspace Key Vault (a value would sit in its job spec)."""
        if not (on_azureml(self.wf.systems, self.host_name) or on_azureml(self.wf.systems, self.target_name)):
            return
        from orchestrator.core.secrets import split_secrets

        sections = {f"passes.{n}": e.config or {} for n, e in self.wf.passes.items()}
        sections.update({f"data_configs[{i}]": dc.model_dump(mode="json") for i, dc in enumerate(self.wf.data_configs)})
        for where, cfg in sections.items():
            found = split_secrets(cfg)[1]
            if found:
                raise PreflightError(
                    f"{where}.{next(iter(found))}: a secret written into the workflow cannot reach an Azure ML job "
                    "without being stored in its job spec; put it in the workspace Key Vault and set hf_token: true "
                    "on the system (the value is not shown)"
                )

    def _check_held_out(self, name: str, entry: Any, rows: dict[str, int | None]) -> None:
        """Rows a pass holds out for evaluation leave some of its data to train on."""
        held = load_pass(entry.type).held_out(entry.config or {})
        total = rows.get(held.data_config) if held is not None else None
        if held is None or total is None:
            return
        size = held.size
        left = total - (int(size) if size >= 1 else round(total * size))
        if left < 1:
            raise PreflightError(
                f"passes.{name}: holding out {size!r} rows for evaluation leaves none of the {total} rows of data "
                f"config {held.data_config!r} to train on; hold out fewer (a fraction such as 0.2 works for any size)"
            )

    def _check_evaluator_device(self) -> None:
        """The evaluator runs the model with the first execution provider on the target: one this machine has no
        runtime for (DirectML, WebGPU, ...) is refused now, not after every pass ran. CUDA without a CUDA GPU is
        not refused: the evaluation runs on the CPU execution provider, said in a note."""
        if not getattr(self.wf.engine, "evaluator", None) or on_azureml(self.wf.systems, self.target_name):
            return
        first = self.providers[0]
        if first in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            return  # CUDA without a GPU here: the engine evaluates on the CPU, said (HostDevices.cpu_evaluation)
        lacks = f"no {first} runtime"
        raise PreflightError(
            f"engine.evaluator: the target {self.target_name!r} evaluates with {first} (its first execution "
            f"provider) and this machine has {lacks}; list CPUExecutionProvider first, drop the evaluator, "
            "or run on a GPU system"
        )

    def _system_type(self, name: str) -> str:
        """The system's kind ("local", "docker", "aml"; "" when unknown) without building it."""
        sys_cfg = self.wf.systems.get(name)
        return keyword_of(str(sys_cfg.model_dump(mode="json").get("type") or "LocalSystem") if sys_cfg else name)

    def inputs(self) -> list[tuple[str, Path]]:
        """(field, path) of every local input the run reads: the model, the adapter, the data files and folders,
        the data scripts."""
        from orchestrator.engine.resources import _as_dict, is_remote, local_model_path

        found: list[tuple[str, Path]] = []
        im = self.wf.input_model
        ref = _as_dict(im.model_ref)
        if not is_remote(ref):
            raw = local_model_path(ref)
            if raw:
                found.append(("input_model.model_path", written_path(self.base_dir, str(raw))))
        if getattr(im, "adapter_path", None):
            found.append(("input_model.adapter_path", written_path(self.base_dir, im.adapter_path)))
        for i, dc in enumerate(self.wf.data_configs):
            cfg = dc.model_dump(mode="json")
            for fld, _, paths in local_data_paths(cfg, self.base_dir):
                found += [(f"data_configs[{i}].load_dataset_config.{fld}", p) for p in paths]
            for key in ("user_script", "script_dir"):
                if isinstance(cfg.get(key), str):
                    found.append((f"data_configs[{i}].{key}", written_path(self.base_dir, cfg[key])))
        return found

    def _check_outputs_apart_from_inputs(self, *, tracking: bool = False) -> None:
        """output_dir and cache_dir are not, do not contain and do not sit inside any input, symlinks resolved:
        publishing into a folder inside the model copies the model into itself, and a cache or output folder
        that holds an input replaces or deletes it. The cache's own inputs (models/, remote/) are its to hold.
        A local tracking store (sqlite file) is not written inside an input either."""
        from orchestrator.engine.mlflow_store import sqlite_db

        outputs = [("engine.cache_dir", self.cache_root)]
        if self.output_dir is not None:
            outputs.insert(0, ("engine.output_dir", self.output_dir))
        db = sqlite_db(self.tracking_uri) if tracking else None
        if db is not None:
            outputs.append(("tracking URI", db.absolute()))
        check_apart_from_inputs(outputs, self.inputs())
