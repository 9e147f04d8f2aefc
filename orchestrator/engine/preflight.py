"""Checks that run before the first pass: everything a run will read or write, looked at once, read-only.

A bad input should cost the user a second, not a fine-tune: the engine calls `preflight` before it plans
(hashes), submits or opens MLflow, and every problem is one line naming the field and the fix. Nothing here
writes a file. Remote references (azureml:..., datastores) are checked where they are downloaded; Hugging Face
hub ids are asked of the hub here (one short request each: it exists, the token may read it, or it is cached).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.core.gpu import cuda_available
from orchestrator.core.job import is_uri
from orchestrator.passes.registry import load_pass
from orchestrator.systems.registry import is_azureml, keyword_of

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
JSON_PARSE_LIMIT = 32 << 20  # parse a whole JSON document up to this size; JSON lines: the first rows only
ROWS_CHECKED = 1000


class PreflightError(UserError):
    """An input that cannot work: one line naming the field and the fix (raised before anything runs)."""


def check_name(field: str, value: str | None) -> None:
    """workflow_id & co name MLflow runs, registered models and folders: no '/', ':', spaces."""
    if value is None:
        return
    if not isinstance(value, str) or not NAME.match(value):
        raise PreflightError(
            f"{field} {value!r}: use letters, digits, '.', '_' and '-' only (at most 128, starting with a letter "
            "or digit); it names the MLflow run, the registered model and folders"
        )


def check_writable_dir(field: str, path: Path) -> None:
    """path is a folder we can write, or can be created: never a file, never under a read-only parent."""
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{field} {path} is a file, not a folder; give a folder path (it is created if missing)")
    probe = path
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(f"{field} {path}: {probe} is a file, so the folder cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" ({probe} is not writable, so it cannot be created)"
        raise PreflightError(f"{field} {path} is not writable{where}; choose a folder you can write to")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise PreflightError(f"{what}: {path} is not readable (permission denied)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PreflightError(f"{what}: {path} is not valid JSON ({_first_line(exc)}); restore it") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_safetensors(path: Path, what: str) -> None:
    """The header of a .safetensors file parses and its tensors fit in the file (a truncated copy fails here)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except PermissionError:
        raise PreflightError(f"{what}: {path} is not readable (permission denied)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise PreflightError(f"{what}: {path} is not a valid safetensors file ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise PreflightError(f"{what}: {path} is not a valid safetensors file (header is not a mapping)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + n + max(ends) > size:
        raise PreflightError(
            f"{what}: {path} is truncated ({size} bytes, its header describes {8 + n + max(ends)}); copy it again"
        )


def check_model_folder(path: Path, what: str, *, needs_tokenizer: bool = True) -> str:
    """A local input model: readable, and either ONNX (GenAI) or an HF checkpoint with config, weights and
    tokenizer. Returns the format found (hf, onnx, onnx_genai)."""
    if not path.exists():
        raise PreflightError(f"{what}: {path} not found; give a local model folder (with config.json and weights)")
    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx"
        raise PreflightError(
            f"{what}: {path} is a file; give the model folder that holds it (config.json, weights, tokenizer)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise PreflightError(f"{what}: {path} is not readable (permission denied)")
    if (path / "genai_config.json").exists():
        _read_json(path / "genai_config.json", what)
        return "onnx_genai"
    if any(path.glob("*.onnx")):
        return "onnx"
    config = path / "config.json"
    if not config.exists():
        raise PreflightError(
            f"{what}: {path} has no config.json; give a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    cfg = _read_json(config, what)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise PreflightError(f"{what}: {config} has no model_type; it is not a transformers model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("pytorch_model*.bin")):
        raise PreflightError(f"{what}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    for w in weights:
        check_safetensors(w, what)
    if needs_tokenizer and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise PreflightError(
            f"{what}: {path} has no tokenizer (tokenizer.json or tokenizer.model); copy the base model's tokenizer "
            "files into it"
        )
    if (path / "tokenizer.json").exists():
        _read_json(path / "tokenizer.json", what)
    return "hf"


def check_adapter_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise PreflightError(f"{what}: {path} not found; give the adapter folder a LoRA run wrote (adapter/)")
    if not path.is_dir():
        raise PreflightError(f"{what}: {path} is a file; give the adapter folder (adapter_config.json + weights)")
    if not (path / "adapter_config.json").exists():
        raise PreflightError(f"{what}: {path} has no adapter_config.json; it is not a PEFT adapter folder")
    _read_json(path / "adapter_config.json", what)
    for w in sorted(path.glob("*.safetensors")):
        check_safetensors(w, what)


# ---- data -------------------------------------------------------------------------------------------------
def hub_dataset_id(data_name: Any) -> bool:
    from orchestrator.core.hub import is_dataset_id

    return is_dataset_id(data_name)


def local_data_paths(data_config: dict[str, Any], base_dir: Path) -> list[tuple[str, str, list[Path]]]:
    """(field, as written, local matches) for every local path a data config reads: data_files as a string, a
    list or globs, data_name or data_dir when they are paths. Remote references (a hub dataset's files
    included) are left out."""
    load = data_config.get("load_dataset_config") or {}
    out: list[tuple[str, str, list[Path]]] = []
    if hub_dataset_id(load.get("data_name")):
        return out
    files = load.get("data_files")
    for i, value in enumerate(files if isinstance(files, list) else [files]):
        if not isinstance(value, str) or is_uri(value):
            continue
        field = "data_files" if not isinstance(files, list) else f"data_files[{i}]"
        out.append((field, value, _matches(value, base_dir)))
    for key in ("data_name", "data_dir"):
        value = load.get(key)
        if isinstance(value, str) and not is_uri(value):
            p = _abs(value, base_dir)
            if p.exists() or key == "data_dir" or value.startswith(("./", "../", "/", "~")):
                out.append((key, value, [p] if p.exists() else []))
    return out


def _abs(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _matches(value: str, base_dir: Path) -> list[Path]:
    p = _abs(value, base_dir)
    if glob.has_magic(str(p)):
        return [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
    return [p] if p.exists() else []


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet", ".arrow")


def check_data_config(data_config: dict[str, Any], base_dir: Path, where: str) -> None:
    """Each local file a data config names exists, is readable, is not empty, parses, and has the columns
    its text_template / text_cols name (checked on the first rows)."""
    pre = data_config.get("pre_process_data_config") or {}
    scripted = _scripted(data_config)
    if "load_dataset" in scripted:  # the user_script's function reads the data its own way (checked when it runs)
        return
    columns = [] if "pre_process_data" in scripted else _needed_columns(pre)
    for field, written, found in local_data_paths(data_config, base_dir):
        label = f"{where}.load_dataset_config.{field}"
        if not found:
            hint = "matches no file" if glob.has_magic(written) else f"not found (looked at {_abs(written, base_dir)})"
            raise PreflightError(f"{label}: {written!r} {hint}")
        files: list[Path] = []
        for p in found:
            if p.is_dir():
                if not os.access(p, os.R_OK | os.X_OK):
                    raise PreflightError(f"{label}: folder {p} is not readable (permission denied)")
                inner = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in DATA_SUFFIXES]
                if not inner and field != "data_dir":
                    raise PreflightError(f"{label}: folder {p} holds no data file ({', '.join(DATA_SUFFIXES)})")
                files += inner
            else:
                files.append(p)
        for f in files:
            check_data_file(f, label, columns)


def _scripted(data_config: dict[str, Any]) -> set[str]:
    """The components a data config's user_script does ("load_dataset", "pre_process_data")."""
    if not data_config.get("user_script"):
        return set()
    from orchestrator.schema.models import DataConfig

    dc = DataConfig.model_validate(data_config)
    return {kind for kind in ("load_dataset", "pre_process_data") if dc.script_component(kind) is not None}


def _needed_columns(pre: dict[str, Any]) -> list[str]:
    template = pre.get("text_template")
    if template:
        from orchestrator.passes.common.data import template_columns

        try:
            fields = template_columns(template)
        except ValueError as exc:
            raise PreflightError(f"pre_process_data_config.text_template: {exc}") from None
        return [c for c in fields if c]
    cols = pre.get("text_cols")
    return [cols] if isinstance(cols, str) else list(cols or [])


def check_data_file(path: Path, label: str, columns: list[str]) -> None:
    if not os.access(path, os.R_OK):
        raise PreflightError(f"{label}: {path} is not readable (permission denied)")
    size = path.stat().st_size
    if size == 0:
        raise PreflightError(f"{label}: {path} is empty; it needs at least one row")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows = _json_rows(path, label, size)
    elif suffix == ".csv":
        rows = _csv_rows(path, label)
    elif suffix == ".txt":
        if not path.read_bytes()[: 1 << 20].strip():
            raise PreflightError(f"{label}: {path} has only blank lines; it needs at least one row")
        return
    else:
        return  # parquet/arrow: binary formats datasets checks itself
    if rows is None:
        return
    if not rows:
        raise PreflightError(f"{label}: {path} has no rows")
    first = rows[0]
    if not isinstance(first, dict):
        raise PreflightError(f"{label}: {path} rows must be JSON objects (one per line), got {type(first).__name__}")
    # "{Best Answer}" is a column; "{row.x}", "{a[0]}", "{n:>5}", "{s!r}" need the column before the suffix
    missing = [c for c in columns if c not in first and re.split(r"[.\[:!]", c, maxsplit=1)[0] not in first]
    if missing:
        raise PreflightError(
            f"{label}: {path} has no column {missing[0]!r} that the text_template/text_cols names "
            f"(columns: {', '.join(map(str, first)) or 'none'})"
        )


def _json_rows(path: Path, label: str, size: int) -> list[Any] | None:
    try:
        with path.open(encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
            if head.startswith("["):  # a JSON document holding a list of rows
                if size > JSON_PARSE_LIMIT:
                    return None  # too big to parse twice; datasets reports its own errors for it
                fh.seek(0)
                data = json.load(fh)
                return list(data[:ROWS_CHECKED]) if isinstance(data, list) else [data]
            fh.seek(0)
            rows: list[Any] = []
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    if lineno == 1 and size <= JSON_PARSE_LIMIT:  # maybe one pretty-printed JSON object
                        try:
                            fh.seek(0)
                            data = json.load(fh)
                        except ValueError:
                            pass
                        else:
                            return _rows_of(data)
                    raise PreflightError(
                        f"{label}: {path} line {lineno} is not valid JSON ({_first_line(exc)}); fix or remove it"
                    ) from None
                if len(rows) >= ROWS_CHECKED:
                    break
            return rows
    except UnicodeDecodeError:
        raise PreflightError(f"{label}: {path} is not UTF-8 text; save it as UTF-8 JSON lines") from None
    except ValueError as exc:
        raise PreflightError(f"{label}: {path} is not valid JSON ({_first_line(exc)})") from None


def _rows_of(data: Any) -> list[Any]:
    """A JSON document as datasets reads it: a list of rows, or a mapping of columns (or one row)."""
    if isinstance(data, list):
        return data[:ROWS_CHECKED]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = min(len(v) for v in data.values())
        return [{k: v[i] for k, v in data.items()} for i in range(min(n, ROWS_CHECKED))]
    return [data]


def _csv_rows(path: Path, label: str) -> list[Any]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = []
            for row in reader:
                rows.append(row)
                if len(rows) >= ROWS_CHECKED:
                    break
            return rows
    except UnicodeDecodeError:
        raise PreflightError(f"{label}: {path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise PreflightError(f"{label}: {path} is not valid CSV ({exc})") from None


_SLICE = r"(\[\s*-?\d*%?\s*:\s*-?\d*%?\s*\](?:\((?:closest|pct1_dropremainder)\))?)?"
SPLIT = re.compile(rf"^\s*[\w.-]+{_SLICE}(\s*\+\s*[\w.-]+{_SLICE})*\s*$")


def check_split(field: str, split: str | None, data_config: dict[str, Any] | None = None) -> None:
    """A datasets split expression ("train", "train[:80%]", "train[10:20]+test"): the syntax, and for data read
    from data_files (one file or a list) the split name, which is then always "train"."""
    if split is None:
        return
    if not isinstance(split, str) or not SPLIT.match(split):
        raise PreflightError(
            f"{field} {split!r} is not a split expression; write e.g. train, train[:80%], train[80%:] or train[:100]"
        )
    load = (data_config or {}).get("load_dataset_config") or {}
    if isinstance(load.get("data_files"), str | list) and not hub_dataset_id(load.get("data_name")):
        names = {re.split(r"[\[\s]", part.strip(), maxsplit=1)[0] for part in split.split("+")}
        wrong = sorted(names - {"train"})
        if wrong:
            raise PreflightError(
                f"{field} {split!r}: data read from data_files has one split, 'train' (not {wrong[0]!r}); carve "
                "parts of it with slices, e.g. train[:80%] and train[80%:]"
            )


# ---- tracking ---------------------------------------------------------------------------------------------
def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """An http(s) MLflow server answers /health within seconds; a sqlite store's folder is writable."""
    from orchestrator.engine.tracking import redact

    if uri.startswith(("http://", "https://")):
        import time
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(uri)
        host = parts.netloc.rsplit("@", 1)[-1]  # credentials stay out of the probe (and of urllib's parser)
        if not host:
            raise PreflightError(f"tracking URI {redact(uri)} has no host; write e.g. http://127.0.0.1:5000")
        bare = urlunsplit((parts.scheme, host, parts.path, "", ""))
        context = None
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":  # as the MLflow client does
            import ssl

            context = ssl._create_unverified_context()  # noqa: S323
        started = time.monotonic()
        try:
            with urllib.request.urlopen(  # noqa: S310
                bare.rstrip("/") + "/health", timeout=timeout, context=context
            ) as resp:
                resp.read(64)
        except urllib.error.HTTPError:
            return  # it answered: a proxy or an old server without /health; the client reports auth errors itself
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PreflightError(
                f"tracking URI {redact(uri)} does not answer ({_first_line(reason)}, after "
                f"{time.monotonic() - started:.1f}s); start the MLflow server, give another --tracking-uri, or "
                "run with --no-tracking"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if db.exists() and not db.is_file():
            raise PreflightError(f"tracking URI {uri}: {db} is a folder; give the path of a .db file")
        check_writable_dir(f"tracking URI {uri}: the folder", db.parent)
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PreflightError(f"tracking URI {uri}: {db} is not writable; give another --tracking-uri")


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

    def _abs(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def run(self, *, tracking: bool = True) -> None:
        """Every input checked before anything is hashed, written or submitted: raises PreflightError (one line:
        the field and the fix). `tracking`: check the tracking URI too."""
        from orchestrator.engine.resources import _as_dict, is_remote

        check_name("workflow_id", getattr(self.wf, "workflow_id", None))
        mlflow_cfg = getattr(self.wf.engine, "mlflow", None)
        check_name("engine.mlflow.register_model_name", getattr(mlflow_cfg, "register_model_name", None))
        check_writable_dir("engine.cache_dir", self.cache_root)
        if self.output_dir is not None:
            check_writable_dir("engine.output_dir", self.output_dir)
        im = self.wf.input_model
        ref = _as_dict(im.model_ref)
        if not is_remote(ref):
            raw = (
                (ref.get("config") or {}).get("path") or ref.get("path") or ref.get("model_path")
                if isinstance(ref, dict)
                else ref
            )
            if raw:
                path = self._abs(str(raw))
                check_model_folder(path, "input_model.model_path")
                self._check_not_overwritten(path, "input_model.model_path")
            elif isinstance(ref, dict) and ref.get("type") == "hf_hub":  # asked of the hub now: exists, reachable
                from orchestrator.core import hub

                hub.pin(hub.HubRef(ref["name"], "model", ref.get("revision")), field="input_model.model_path")
                host = self.wf.systems.get(self.host_name)
                if self.host_is_aml() and hub.needs_token("model", ref["name"]) and not getattr(host, "hf_token", 0):
                    raise PreflightError(
                        f"input_model.model_path: model {ref['name']} is private or gated and the Azure ML job "
                        f"downloads it: set \"hf_token\": true on system {self.host_name!r} (the job reads the "
                        "workspace Key Vault's hf-token secret)"
                    )
        adapter = getattr(im, "adapter_path", None)
        if adapter:
            check_adapter_folder(self._abs(adapter), "input_model.adapter_path")
            self._check_not_overwritten(self._abs(adapter), "input_model.adapter_path")
        # a user_script runs where the data is read; --host / --target may name a system the reader did not check
        names = dict.fromkeys([self.host_name, self.target_name])
        remote = [n for n in names if self._system_type(n) in ("docker", "aml")]
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
            else:
                check_data_config(cfg, self.base_dir, f"data_configs[{i}]")
            check_split(f"data_configs[{i}].load_dataset_config.split", load.get("split"), cfg)
        data = {dc.name: dc.model_dump(mode="json") for dc in self.wf.data_configs}
        for name, entry in self.wf.passes.items():
            for ref in load_pass(entry.type).split_refs(entry.config or {}):
                check_split(f"passes.{name}.{ref.field}", ref.split, data.get(ref.data_config or ""))
        self._check_evaluator_device()
        if tracking:
            check_tracking_uri(self.tracking_uri)

    def _check_evaluator_device(self) -> None:
        """The evaluator runs the model with the first execution provider on the target: a CUDA-only target on
        this machine without a CUDA GPU is refused now, not after every pass ran."""
        if not getattr(self.wf.engine, "evaluator", None) or self.host_is_aml(self.target_name):
            return
        first = self.providers[0]
        if first == "CPUExecutionProvider" or (first == "CUDAExecutionProvider" and cuda_available()):
            return
        lacks = "no CUDA GPU" if first == "CUDAExecutionProvider" else f"no {first} runtime"
        raise PreflightError(
            f"engine.evaluator: the target {self.target_name!r} evaluates with {first} (its first execution "
            f"provider) and this machine has {lacks}; list CPUExecutionProvider first, drop the evaluator, "
            "or run on a GPU system"
        )

    def _system_type(self, name: str) -> str:
        """The system's kind ("local", "docker", "aml"; "" when unknown) without building it."""
        sys_cfg = self.wf.systems.get(name)
        return keyword_of(str(sys_cfg.model_dump(mode="json").get("type") or "LocalSystem") if sys_cfg else name)

    def host_is_aml(self, name: str | None = None) -> bool:
        sys_cfg = self.wf.systems.get(name or self.host_name)
        type_name = sys_cfg.model_dump(mode="json").get("type", "") if sys_cfg is not None else (name or self.host_name)
        return is_azureml(str(type_name))

    def _check_not_overwritten(self, path: Path, field: str) -> None:
        """Publishing replaces output_dir/model and output_dir/adapter: an input there would be lost."""
        if self.output_dir is None:
            return
        real = path.resolve()
        for name in ("model", "adapter"):
            dest = (self.output_dir / name).resolve()
            if real == dest or dest in real.parents:
                raise PreflightError(
                    f"{field} {path} is inside the output folder {self.output_dir / name}, which this run "
                    "replaces; give another --output_path / engine.output_dir"
                )
