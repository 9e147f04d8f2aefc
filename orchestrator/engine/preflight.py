"""Checks that run before the first pass: everything a run will read or write, looked at once, read-only.

A bad input should cost the user a second, not a fine-tune: the engine calls `preflight` before it plans
(hashes), submits or opens MLflow, and every problem is one line naming the field and the fix. Nothing here
writes a file. Remote references (azureml:..., datastores) are checked where they are downloaded; Hugging Face
hub ids are asked of the hub here (one short request each: it exists, the token may read it, or it is cached).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.core.job import is_uri
from orchestrator.core.links import Overlap, check_tree, link_problem, real, short
from orchestrator.engine.data_check import DataFileError, Needed, needed_columns, scan_file, split_rows
from orchestrator.engine.weights_check import check_weights_match_config
from orchestrator.passes.registry import load_pass
from orchestrator.schema.resources import REMOTE_TYPES
from orchestrator.systems.registry import is_azureml, keyword_of

CACHE_INPUT_FOLDERS = ("models", "remote")  # folders of the cache that hold inputs orch made (a converted model)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


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
    """path is a folder we can write, or can be created: never a file, never under a read-only parent, never
    (through) a symlink that leads nowhere."""
    problem = link_problem(path)
    if problem is not None:
        raise PreflightError(
            f"{field} {short(path)}: {problem}; remove the link, make it point at a folder, or give another folder"
        )
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
        data = path.read_bytes()
    except PermissionError:
        raise PreflightError(f"{what}: {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise PreflightError(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        from orchestrator.schema.files import encoding_problem

        raise PreflightError(f"{what}: {path} {encoding_problem(data, exc)}") from None
    except ValueError as exc:
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


def check_model_folder(
    path: Path, what: str, *, needs_tokenizer: bool = True, matched: set[str] | None = None
) -> str:
    """A local input model: readable, and either ONNX (GenAI) or an HF checkpoint with config, weights and
    tokenizer that fit each other. Returns the format found (hf, onnx, onnx_genai). `matched`: digests of
    config + weights known to match (weights_check's memo); the digest checked here is added to it."""
    if not path.exists():
        problem = link_problem(path)
        if problem:
            raise PreflightError(f"{what}: {problem}; give a local model folder (with config.json and weights)")
        raise PreflightError(f"{what}: {path} not found; give a local model folder (with config.json and weights)")
    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx"
        raise PreflightError(
            f"{what}: {path} is a file; give the model folder that holds it (config.json, weights, tokenizer)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise PreflightError(f"{what}: {path} is not readable (permission denied)")
    check_tree(path, what)  # a link loop or a link out of the folder: publishing a copy of it could never end
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
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            _read_json(path / name, what)
    if (path / "tokenizer.json").exists():
        check_tokenizer_file(path / "tokenizer.json", cfg, what)
    if weights:
        digest = check_weights_match_config(path, cfg, what, known=matched)
        if digest is not None and matched is not None:
            matched.add(digest)
    return "hf"


def check_tokenizer_file(path: Path, cfg: dict[str, Any], what: str) -> None:
    """tokenizer.json is a tokenizer (the `tokenizers` library reads it) whose ids fit the model's embedding."""
    data = _read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise PreflightError(
            f"{what}: {path} is JSON but not a tokenizer (no 'model' section); copy the base model's tokenizer.json"
        )
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except ImportError:
        return
    except Exception as exc:  # tokenizers raises its own Exception subclass with the parse error
        raise PreflightError(
            f"{what}: {path} is not a tokenizer the tokenizers library can read ({_first_line(exc)}); copy the base "
            "model's tokenizer.json"
        ) from None
    vocab = cfg.get("vocab_size")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and size > vocab:
        raise PreflightError(
            f"{what}: {path} has {size} tokens but config.json's vocab_size is {vocab}: token ids past {vocab - 1} "
            "have no embedding; use the tokenizer that came with the model"
        )


def check_adapter_folder(path: Path, what: str) -> None:
    if not path.exists():
        problem = link_problem(path) or f"{path} not found"
        raise PreflightError(f"{what}: {problem}; give the adapter folder a LoRA run wrote (adapter/)")
    if not path.is_dir():
        raise PreflightError(f"{what}: {path} is a file; give the adapter folder (adapter_config.json + weights)")
    check_tree(path, what)
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
    if is_resource_dict(files):  # Olive's typed path ({"type": "azureml_datastore", ...}): not a split mapping
        local = (files.get("config") or files).get("path") if files["type"] in ("file", "folder") else None
        files = local if isinstance(local, str) else None
    groups = files.items() if isinstance(files, dict) else [("", files)]  # {split: file(s)}, a list, one file
    for split, group in groups:
        prefix = f"data_files.{split}" if split else "data_files"
        for i, value in enumerate(group if isinstance(group, list) else [group]):
            if not isinstance(value, str) or is_uri(value):
                continue
            name = prefix if not isinstance(group, list) else f"{prefix}[{i}]"
            out.append((name, value, _matches(value, base_dir)))
    for key in ("data_name", "data_dir"):
        value = load.get(key)
        if isinstance(value, str) and not is_uri(value):
            p = _abs(value, base_dir)
            if p.exists() or key == "data_dir" or value.startswith(("./", "../", "/", "~")):
                out.append((key, value, [p] if p.exists() else []))
    return out


RESOURCE_TYPES = frozenset({"file", "folder", "hf_hub", "azureml_data", *REMOTE_TYPES})


def is_resource_dict(value: Any) -> bool:
    """A resource written as Olive's typed dict (its "type" names a resource kind), not a {split: files} map."""
    return isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] in RESOURCE_TYPES


def _abs(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _matches(value: str, base_dir: Path) -> list[Path]:
    p = _abs(value, base_dir)
    if glob.has_magic(str(p)):
        return [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
    return [p] if p.exists() else []


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet", ".arrow")  # also gzipped (.jsonl.gz)


def check_data_config(data_config: dict[str, Any], base_dir: Path, where: str) -> int | None:
    """Each local file a data config names exists, is readable, is not empty, parses, and every row has the
    columns its text_template / text_cols name (engine/data_check.py reads the whole file). Returns the rows of
    all its files (None when some cannot be counted)."""
    pre = data_config.get("pre_process_data_config") or {}
    scripted = _scripted(data_config)
    if "load_dataset" in scripted:  # the user_script's function reads the data its own way (checked when it runs)
        return None
    needed = Needed() if "pre_process_data" in scripted else _needed_columns(pre, where)
    paths = local_data_paths(data_config, base_dir)
    total: int | None = 0 if paths else None  # no local file (a hub dataset, a datastore): rows unknown here
    for field, written, found in paths:
        label = f"{where}.load_dataset_config.{field}"
        if not found:
            problem = link_problem(_abs(written, base_dir))
            hint = "matches no file" if glob.has_magic(written) else f"not found (looked at {_abs(written, base_dir)})"
            raise PreflightError(f"{label}: {written!r} {problem or hint}")
        files: list[Path] = []
        for p in found:
            if p.is_dir():
                if not os.access(p, os.R_OK | os.X_OK):
                    raise PreflightError(f"{label}: folder {p} is not readable (permission denied)")
                check_tree(p, label)
                inner = [f for f in sorted(p.rglob("*")) if f.is_file() and _data_suffix(f) in DATA_SUFFIXES]
                if not inner and field != "data_dir":
                    raise PreflightError(f"{label}: folder {p} holds no data file ({', '.join(DATA_SUFFIXES)})")
                files += inner
            else:
                files.append(p)
        for f in files:
            rows = check_data_file(f, label, needed)
            total = None if total is None or rows is None else total + rows
    return total


def _data_suffix(path: Path) -> str:
    return Path(path.name.lower().removesuffix(".gz")).suffix


def _scripted(data_config: dict[str, Any]) -> set[str]:
    """The components a data config's user_script does ("load_dataset", "pre_process_data")."""
    if not data_config.get("user_script"):
        return set()
    from orchestrator.schema.models import DataConfig

    dc = DataConfig.model_validate(data_config)
    return {kind for kind in ("load_dataset", "pre_process_data") if dc.script_component(kind) is not None}


def _needed_columns(pre: dict[str, Any], where: str = "data_configs") -> Needed:
    if pre.get("chat_template"):  # rows are chat messages (their form checked on the first row), not text columns
        return Needed(chat_col=pre.get("message_col") or "messages")
    template = pre.get("text_template")
    if template:
        from orchestrator.passes.common.data import template_columns

        try:
            fields = template_columns(template)
        except ValueError as exc:
            raise PreflightError(f"{where}.pre_process_data_config.text_template: {exc}") from None
        if not fields:
            raise PreflightError(
                f"{where}.pre_process_data_config.text_template {template[:60]!r} names no column, so every row "
                "would train on the same text; put the columns in braces, e.g. {prompt} {response}"
            )
        return needed_columns([c for c in fields if c], [])
    cols = pre.get("text_cols")
    return needed_columns([], [cols] if isinstance(cols, str) else list(cols or ["text"]))


def check_data_file(path: Path, label: str, needed: Needed | list[str]) -> int | None:
    """One data file read whole (engine/data_check.py); its row count, or None for a format not counted here."""
    if isinstance(needed, list):
        needed = needed_columns(needed, [])
    if not os.access(path, os.R_OK):
        raise PreflightError(f"{label}: {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise PreflightError(f"{label}: {path} is empty; it needs at least one row")
    try:
        return scan_file(path, label, Needed(list(needed.plain), list(needed.nested), needed.chat_col))
    except DataFileError as exc:
        raise PreflightError(str(exc)) from None


_SLICE = r"(\[\s*-?\d*%?\s*:\s*-?\d*%?\s*\](?:\((?:closest|pct1_dropremainder)\))?)?"
SPLIT = re.compile(rf"^\s*[\w.-]+{_SLICE}(\s*\+\s*[\w.-]+{_SLICE})*\s*$")


def check_split(
    field: str, split: str | None, data_config: dict[str, Any] | None = None, rows: int | None = None
) -> None:
    """A datasets split expression ("train", "train[:80%]", "train[10:20]+test"): the syntax, for data read
    from data_files (one file or a list) the split name, which is then always "train", and with the data's `rows`
    known, that the split selects at least one of them."""
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
    if rows is not None and split_rows(split, rows) == 0:
        raise PreflightError(f"{field} {split!r} selects no rows: the data has {rows}; widen the slice")


# ---- tracking ---------------------------------------------------------------------------------------------
TRACKING_SCHEMES = (
    "http", "https", "sqlite", "file", "postgresql", "postgres", "mysql", "mssql", "databricks", "databricks-uc",
    "azureml", "uc",
)  # fmt: skip
def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """An http(s) MLflow server answers /health within seconds; a sqlite store's folder is writable."""
    from orchestrator.engine.tracking import redact

    if uri.startswith(("http://", "https://")):
        import time
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018  (raises for a port that is not a number)
        except ValueError as exc:
            raise PreflightError(
                f"tracking URI {redact(uri)} is not a valid URL ({exc}); write e.g. http://127.0.0.1:5000"
            ) from None
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
        from orchestrator.engine.mlflow_store import check_store_schema, is_sqlite_file, sqlite_db

        db = sqlite_db(uri)
        if db is None:
            if uri.split("?", 1)[0] != "sqlite:///:memory:":
                raise PreflightError(f"tracking URI {uri} names no database file; write e.g. sqlite:///mlruns.db")
            return
        problem = link_problem(db)
        if problem:
            raise PreflightError(f"tracking URI {uri}: {problem}; give another --tracking-uri")
        if db.exists() and not db.is_file():
            raise PreflightError(f"tracking URI {uri}: {db} is a folder; give the path of a .db file")
        check_writable_dir(f"tracking URI {uri}: the folder", db.absolute().parent)
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise PreflightError(f"tracking URI {uri}: {db} is not writable; give another --tracking-uri")
        if db.exists() and not is_sqlite_file(db):
            raise PreflightError(
                f"tracking URI {uri}: {db} is not an SQLite database; give the path of an MLflow .db file "
                "(a new name creates one)"
            )
        check_store_schema(uri)
    elif uri.startswith("sqlite:"):
        raise PreflightError(
            f"tracking URI {redact(uri)}: a SQLite URI has three slashes before a relative path "
            "(sqlite:///mlruns.db) and four before an absolute one (sqlite:////home/me/mlruns.db)"
        )
    elif "://" in uri or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\\/]", uri):
        scheme = uri.split(":", 1)[0].lower()
        if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
            raise PreflightError(
                f"tracking URI {redact(uri)}: unknown scheme {scheme!r}; MLflow takes http(s)://host:port, "
                "sqlite:///file.db, file:/folder, postgresql://, mysql://, databricks or azureml://"
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

    def _abs(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else real(self.base_dir / p)

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
        self._check_outputs_apart_from_inputs(tracking=tracking)
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
                check_model_folder(path, "input_model.model_path", matched=self.matched)
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
        if not (self.host_is_aml() or self.host_is_aml(self.target_name)):
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
        if not getattr(self.wf.engine, "evaluator", None) or self.host_is_aml(self.target_name):
            return
        first = self.providers[0]
        if first in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            return  # CUDA without a GPU here: the engine evaluates on the CPU, said (Engine._cpu_evaluation)
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

    def host_is_aml(self, name: str | None = None) -> bool:
        sys_cfg = self.wf.systems.get(name or self.host_name)
        type_name = sys_cfg.model_dump(mode="json").get("type", "") if sys_cfg is not None else (name or self.host_name)
        return is_azureml(str(type_name))

    def inputs(self) -> list[tuple[str, Path]]:
        """(field, path) of every local input the run reads: the model, the adapter, the data files and folders,
        the data scripts."""
        from orchestrator.engine.resources import _as_dict, is_remote

        found: list[tuple[str, Path]] = []
        im = self.wf.input_model
        ref = _as_dict(im.model_ref)
        if not is_remote(ref):
            raw = (
                (ref.get("config") or {}).get("path") or ref.get("path") or ref.get("model_path")
                if isinstance(ref, dict)
                else ref
            )
            if raw:
                found.append(("input_model.model_path", self._abs(str(raw))))
        if getattr(im, "adapter_path", None):
            found.append(("input_model.adapter_path", self._abs(im.adapter_path)))
        for i, dc in enumerate(self.wf.data_configs):
            cfg = dc.model_dump(mode="json")
            for fld, _, paths in local_data_paths(cfg, self.base_dir):
                found += [(f"data_configs[{i}].load_dataset_config.{fld}", p) for p in paths]
            for key in ("user_script", "script_dir"):
                if isinstance(cfg.get(key), str):
                    found.append((f"data_configs[{i}].{key}", self._abs(cfg[key])))
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
        for in_field, inp in self.inputs():
            for out_field, out in outputs:
                overlap = Overlap.of(out, inp)
                if overlap is None or (overlap.relation == "is inside" and not real(inp).is_dir()):
                    continue  # a folder "inside" a file: the writable-folder checks name that
                if out_field == "engine.cache_dir" and overlap.relation == "contains":
                    inside = real(inp).relative_to(real(out)).parts
                    if inside and inside[0] in CACHE_INPUT_FOLDERS:
                        continue
                what = {"engine.output_dir": "output folder", "engine.cache_dir": "cache folder"}.get(
                    out_field, "tracking store"
                )
                if overlap.relation == "contains":
                    message = (
                        f"{in_field} {short(inp)} is inside the {what} {short(out)} ({out_field}), which this run "
                        f"writes and replaces parts of; give a {what} that holds no input"
                    )
                else:
                    message = (
                        f"{out_field} {short(out)} {overlap.relation} the input {in_field} {short(inp)}"
                        + (f" (resolved: {short(real(out))})" if real(out) != Path(os.path.abspath(out)) else "")
                        + f": orch never writes into an input; give a {what} apart from the model, adapter and data"
                    )
                raise PreflightError(message)
